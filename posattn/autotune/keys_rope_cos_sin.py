"""Key builder for apply_rope_cos_sin (op "rope_cos_sin"), in its two common forms per token
bucket: a float32 cos_sin_cache indexed by int64 positions (vLLM / FlashInfer) and
transformers' per-token [B, S, D] cos/sin in the model's dtype (each half of a pair read
from its own half of the table)."""
from __future__ import annotations

from posattn.autotune.keys import make_key
from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.rope.cos_sin import CosSinKey

    out = []
    for b in sorted({token_bucket(t) for t in tokens}):
        for table_dtype, split, pos_dtype in (("float32", False, "int64"), (dtype, True, "")):
            out.append(make_key(CosSinKey, device_type=device_type, dtype=dtype, table_dtype=table_dtype,
                                head_dim=shape.head_dim, rotary_dim=shape.rotary_dim,
                                interleaved=shape.interleaved, split=split, pos_dtype=pos_dtype,
                                heads_q=shape.heads_q, heads_k=shape.heads_k, tokens_bucket=b))
    return out

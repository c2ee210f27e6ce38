"""Key builder for apply_rope (op "rope"): one RopeKey per token bucket, int64 positions."""
from __future__ import annotations

from posattn.autotune.keys import make_key
from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.rope.layout import RopeKey

    return [make_key(RopeKey, device_type=device_type, dtype=dtype, head_dim=shape.head_dim,
                     rotary_dim=shape.rotary_dim, interleaved=shape.interleaved, heads_q=shape.heads_q,
                     heads_k=shape.heads_k, pos_dtype="int64", tokens_bucket=b)
            for b in sorted({token_bucket(t) for t in tokens})]

"""Key builder for posattn.select.scores: one query per request over paged caches (page 16) of
``tokens`` slots, batch 1 and 8, post-RoPE keys, per query head and per KV group (kv_group)."""
from __future__ import annotations

from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.select.scores import ScoresKey

    # heads_q = heads_k too: reduce="kv_group" hands the kernel one summed query per KV head
    return [ScoresKey(device_type, dtype, shape.head_dim, hq, shape.heads_k, 16, False,
                      token_bucket(max(t, 16)), B)
            for t in sorted(set(tokens)) for B in (1, 8) for hq in sorted({shape.heads_q, shape.heads_k})]

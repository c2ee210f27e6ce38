"""Key builder for posattn.select.topk: rows of ``tokens`` scores (one row per request x KV head,
batch 8), k 2048 (clamped to the row) and 256."""
from __future__ import annotations

from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.select.topk import TopkKey

    out = []
    for t in sorted({token_bucket(max(t, 16)) for t in tokens}):
        for k in sorted({min(2048, t), min(256, t)}):
            out.append(TopkKey(device_type, "float32", token_bucket(k), t, token_bucket(8 * shape.heads_k)))
    return out

"""Key builder for posattn.vq's centroid-lookup scores (the A2ATS pipeline's far tokens): 1024 codes,
page 16, ``tokens`` cached per request, batch 1 and 8."""
from __future__ import annotations

from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.vq.ops import VqScoresKey

    return [VqScoresKey(device_type, dtype, shape.head_dim, shape.heads_q, shape.heads_k, token_bucket(1024), 16,
                        token_bucket(t), B)
            for t in sorted(set(tokens)) for B in (1, 8)]

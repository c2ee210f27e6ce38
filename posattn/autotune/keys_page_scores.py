"""Key builder for posattn.select.page_scores: Quest page bounds over ``tokens / 16`` pages per
request, batch 1 and 8."""
from __future__ import annotations

from posattn.lowered import token_bucket


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.select.quest import PageScoresKey

    return [PageScoresKey(device_type, dtype, shape.head_dim, shape.heads_q, shape.heads_k,
                          token_bucket(max(1, t // 16)), B)
            for t in sorted(set(tokens)) for B in (1, 8)]

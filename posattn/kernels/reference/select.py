"""fp64-free reference of posattn.select.topk (selection is exact: no arithmetic, only order).

Contract (every backend): ``topk(scores [R, N] fp32 (fp64 on the reference), lengths [R] int32,
k, sinks, window)`` -> int32 [R, k]. Row r's valid entries are its first ``L = clamp(lengths[r],
0, N)``; the chosen set has ``min(k, L)`` members: the first ``sinks`` and the last ``window``
valid entries (forced), then the highest remaining scores, ties to the lower index, NaN ranking
below -inf. The chosen indices are written in ascending index order, followed by -1 padding.
(The sorted order is applied by the op, the same on every backend.)
"""
from __future__ import annotations

import torch


def topk(scores: torch.Tensor, lengths: torch.Tensor, k: int, sinks: int, window: int) -> torch.Tensor:
    """int32 [R, k]; see the module docstring."""
    R, N = scores.shape
    s = scores.to(torch.float64)
    L = lengths.to(torch.int64).clamp(0, N)[:, None]                               # [R, 1]
    j = torch.arange(N, device=scores.device)[None, :]                              # [1, N]
    valid = j < L
    forced = valid & ((j < sinks) | (j >= L - window))
    # rank by (forced first, then score descending with NaN lowest, then index ascending):
    # a stable sort by score, then a stable sort by class, keeps ties in index order
    val = torch.where(torch.isnan(s), torch.full_like(s, -float("inf")), s)
    cls = torch.where(forced, 0, torch.where(valid & ~torch.isnan(s), 1, torch.where(valid, 2, 3)))
    o1 = torch.sort(val, dim=-1, descending=True, stable=True).indices
    o2 = torch.sort(torch.gather(cls, 1, o1), dim=-1, stable=True).indices
    order = torch.gather(o1, 1, o2)                                                 # [R, N] ranked indices
    m = torch.minimum(L, torch.full_like(L, k))                                     # [R, 1] chosen per row
    take = torch.arange(N, device=scores.device)[None, :] < m
    chosen = torch.zeros(R, N, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, order, take)
    out = torch.full((R, k), -1, dtype=torch.int32, device=scores.device)
    idx = torch.where(chosen, j.expand(R, N), torch.full_like(chosen, N, dtype=torch.int64))
    asc = torch.sort(idx, dim=-1).values[:, :k]                                     # chosen, ascending
    w = min(k, N)
    out[:, :w] = torch.where(asc[:, :w] < N, asc[:, :w], -1).to(torch.int32)
    return out

"""fp64 reference of Quest's page scores (posattn.select.page_scores' kernel).

Contract: ``page_scores(q [B, Hq, D] fp32 (fp64 here), kmin, kmax [num_pages, Hk, D], page_ids int32
[B, max_pages] (the physical page of each logical page), cache_seqlens int32 [B], page_size)`` ->
fp32 [B, Hq, max_pages]:

    out[b, h, p] = sum_d max(q[b, h, d] * kmin[page, h // G, d], q[b, h, d] * kmax[page, h // G, d])
                   for p * page_size < cache_seqlens[b] (page = page_ids[b, p]); -inf otherwise.
"""
from __future__ import annotations

import torch


def page_scores(q, kmin, kmax, page_ids, cache_seqlens, page_size: int):
    B, HQ, D = q.shape
    NP, HK = kmin.shape[:2]
    MP = page_ids.shape[1]
    pid = page_ids.to(torch.int64)
    pid = torch.where((pid >= 0) & (pid < NP), pid, torch.zeros_like(pid))
    mn = kmin[pid].to(torch.float64).repeat_interleave(HQ // HK, dim=2)          # [B, MP, Hq, D]
    mx = kmax[pid].to(torch.float64).repeat_interleave(HQ // HK, dim=2)
    qd = q.to(torch.float64)[:, None]                                             # [B, 1, Hq, D]
    out = torch.maximum(qd * mn, qd * mx).sum(-1).transpose(1, 2)                 # [B, Hq, MP]
    L = cache_seqlens.to(torch.int64)[:, None, None]
    p = torch.arange(MP, device=q.device)[None, None, :]
    return torch.where(p * page_size < L, out, torch.full_like(out, -float("inf"))).to(torch.float32)

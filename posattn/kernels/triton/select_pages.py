"""Quest page scores (Triton): posattn.select.page_scores' GPU kernel.

Program (request, KV head, block of logical pages): each page's min/max key rows are read once
(through the page ids) and scored against the GQA group's queries, ``sum_d max(q_d min_d, q_d max_d)``.
Contract: posattn/kernels/reference/select_pages.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _page_scores_fwd(Q, KMIN, KMAX, PID, CS, OUT, MP, PS, HK, G, s_qb, s_qh, s_pn, s_ph, s_pid, s_ob, s_oh,
                     D: tl.constexpr, DP: tl.constexpr, BLOCK_P: tl.constexpr):
    pid0 = tl.program_id(0)
    b = pid0 // HK
    hk = pid0 % HK
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    L = tl.load(CS + b)
    valid = (p < MP) & (p * PS < L)
    page = tl.load(PID + b.to(tl.int64) * s_pid + p, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, DP)
    m2 = valid[:, None] & (d < D)[None, :]
    row = page * s_pn + hk.to(tl.int64) * s_ph
    mn = tl.load(KMIN + row[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    mx = tl.load(KMAX + row[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    for g in range(G):
        h = hk * G + g
        q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + d, mask=d < D, other=0.0)
        sc = tl.sum(tl.maximum(q[None, :] * mn, q[None, :] * mx), axis=1)
        sc = tl.where(valid, sc, -float("inf"))
        tl.store(OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + p, sc, mask=p < MP)


def default_config(key) -> dict:
    return {"block_p": 32, "num_warps": 4}


def search_space(key) -> list[dict]:
    return [{"block_p": bp, "num_warps": w} for bp in (16, 32, 64) for w in (2, 4)]


def page_scores(q, kmin, kmax, page_ids, cache_seqlens, page_size, config) -> torch.Tensor:
    """fp32 [B, Hq, max_pages]; see posattn/kernels/reference/select_pages.py."""
    B, HQ, D = q.shape
    HK = kmin.shape[1]
    MP = page_ids.shape[1]
    out = torch.empty(B, HQ, MP, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    bp = int(config.get("block_p", 32))
    _page_scores_fwd[(B * HK, triton.cdiv(MP, bp))](
        q, kmin, kmax, page_ids, cache_seqlens, out, MP, page_size, HK, HQ // HK, q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1), page_ids.stride(0), out.stride(0), out.stride(1),
        D=D, DP=triton.next_power_of_2(D), BLOCK_P=bp, num_warps=int(config.get("num_warps", 4)))
    return out

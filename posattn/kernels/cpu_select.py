"""Top-k on posattn._C (C++ / OpenMP, radix select): posattn.select.topk's CPU backend.
Contract: posattn/kernels/reference/select.py."""
from __future__ import annotations

import torch

from posattn.kernels import cpu as _cpu


def topk(scores: torch.Tensor, lengths: torch.Tensor, k: int, sinks: int, window: int, config: dict) -> torch.Tensor:
    """scores fp32 [R, N] (last dim contiguous), lengths int32 [R] -> int32 [R, k] (ascending, -1 pads)."""
    R, N = scores.shape
    out = torch.empty(R, k, dtype=torch.int32)
    if R:
        ln = lengths.contiguous()
        _cpu._C.topk_forward(scores.data_ptr(), R, N, scores.stride(0), ln.data_ptr(), k, sinks, window,
                             out.data_ptr(), _cpu._threads(config))
    return out


_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def scores(q, k_cache, block_table, cache_seqlens, scale, ktab, rotary_dim, interleaved, config,
           vote=False, far=None) -> torch.Tensor:
    """fp32 [B, Hq, S_max] ([B, 1, S_max] with vote); see posattn/kernels/reference/select_scores.py."""
    B, HQ, D = q.shape
    NB, PS, HK, _ = k_cache.shape
    MB = block_table.shape[1]
    out = torch.empty(B, HQ, MB * PS, dtype=torch.float32)     # vote: the per-head scratch
    res = torch.empty(B, 1, MB * PS, dtype=torch.float32) if vote else out
    if out.numel() == 0:
        return res
    q32 = q.to(torch.float32).contiguous()
    bt, cs = block_table.contiguous(), cache_seqlens.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if ktab is not None:
        kt = ktab.contiguous()
        tstr = [kt.stride(0), kt.stride(1) if kt.shape[1] > 1 else 0, kt.stride(2)]
    else:
        kt, tstr = None, [0, 0, 0]
    extra = [res.data_ptr()] if vote else []
    if far is not None:        # q_far, ktab_far with q's and ktab's (contiguous) strides, far uint8 [B, S_max]
        qf, ktf, fm = far[0].to(torch.float32).contiguous(), far[1].contiguous(), far[2].contiguous()
        assert qf.shape == q32.shape and ktf.shape == kt.shape and fm.shape == (B, MB * PS)
        extra = [extra[0] if vote else 0, qf.data_ptr(), ktf.data_ptr(), fm.data_ptr()]
    _cpu._C.scores_forward([B, HQ, HK, D, PS, MB, int(rotary_dim)],
                           [q32.data_ptr(), k_cache.data_ptr(), bt.data_ptr(), cs.data_ptr(),
                            kt.data_ptr() if kt is not None else 0, out.data_ptr()] + extra,
                           [q32.stride(0), q32.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                            bt.stride(0), *tstr, out.stride(0), out.stride(1)],
                           bool(interleaved), _CODES[k_cache.dtype], float(scale), int(config.get("block_s", 64)),
                           _cpu._threads(config))
    return res


def page_scores(q, kmin, kmax, page_ids, cache_seqlens, page_size, config) -> torch.Tensor:
    """fp32 [B, Hq, max_pages]; see posattn/kernels/reference/select_pages.py."""
    B, HQ, D = q.shape
    HK = kmin.shape[1]
    MP = page_ids.shape[1]
    out = torch.empty(B, HQ, MP, dtype=torch.float32)
    if out.numel() == 0:
        return out
    q32 = q.to(torch.float32).contiguous()
    mn, mx, pid, cs = kmin.contiguous(), kmax.contiguous(), page_ids.contiguous(), cache_seqlens.contiguous()
    _cpu._C.page_scores_forward(q32.data_ptr(), mn.data_ptr(), mx.data_ptr(), _CODES[mn.dtype], pid.data_ptr(),
                                cs.data_ptr(), out.data_ptr(), B, HQ, HK, D, MP, int(page_size), _cpu._threads(config))
    return out

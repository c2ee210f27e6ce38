"""posattn.vq's CPU backend on posattn._C (C++ / OpenMP). Contract: posattn/kernels/reference/vq.py."""
from __future__ import annotations

import torch

from posattn.kernels import cpu as _cpu

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BYTES = {torch.int16: 2, torch.int32: 4}


def assign(keys, metric_centroids, centroid_norms, code_dtype, config=None) -> torch.Tensor:
    """codes [T, Hk] of code_dtype."""
    T, HK, D = keys.shape
    out = torch.empty(T, HK, dtype=code_dtype)
    if out.numel() == 0:
        return out
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    mc, cn = metric_centroids.contiguous(), centroid_norms.contiguous()
    _cpu._C.vq_assign_forward(keys.data_ptr(), _CODES[keys.dtype], T, HK, D, keys.stride(0), keys.stride(1),
                              mc.data_ptr(), cn.data_ptr(), mc.shape[1], out.data_ptr(), _BYTES[code_dtype],
                              _cpu._threads(config or {}))
    return out


def code_scores(qf, centroids, codes, block_table, far_len, scale, out, config) -> torch.Tensor:
    """Fills out fp32 [B, Hq, S_max] (a view, last dim contiguous)."""
    B, HQ, D = qf.shape
    HK, C, _ = centroids.shape
    if out.numel() == 0:
        return out
    q32 = qf.to(torch.float32).contiguous()
    cent = centroids.contiguous()
    bt, fl = block_table.contiguous(), far_len.contiguous()
    _cpu._C.vq_code_scores_forward(
        [B, HQ, HK, D, C, codes.shape[1], bt.shape[1]],
        [q32.data_ptr(), cent.data_ptr(), codes.data_ptr(), bt.data_ptr(), fl.data_ptr(), out.data_ptr()],
        [codes.stride(0), codes.stride(1), bt.stride(0), out.stride(0), out.stride(1)],
        _BYTES[codes.dtype], float(scale), int(config.get("block_s", 256)), _cpu._threads(config))
    return out

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

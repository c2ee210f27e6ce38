"""Helpers shared by the compat doors."""
from __future__ import annotations

import torch


def segment_positions(indptr: torch.Tensor, offsets, nnz: int, device, name: str = "indptr") -> torch.Tensor:
    """Positions of a ragged batch: token t of segment i (indptr[i] <= t < indptr[i+1]) sits at
    ``t - indptr[i] + offsets[i]`` (``offsets`` a [batch] tensor or an int). No device sync on a
    GPU; on CPU tensors ``indptr`` is checked to start at 0 and end at ``nnz``. (Unchecked, a token
    past ``indptr[-1]`` continues the last segment rather than indexing past ``offsets``.)"""
    if indptr.device.type == "cpu" and indptr.numel() and (int(indptr[0]) != 0 or int(indptr[-1]) != nnz):
        raise ValueError(f"{name} must start at 0 and end at the number of tokens ({nnz}); "
                         f"got {int(indptr[0])} ... {int(indptr[-1])}")
    t = torch.arange(nnz, device=device, dtype=indptr.dtype)
    seg = torch.searchsorted(indptr[1:].contiguous(), t, right=True)
    if indptr.numel() > 1:
        seg = seg.clamp_(max=indptr.numel() - 2)
    pos = t - indptr[seg]
    if isinstance(offsets, torch.Tensor):
        pos = pos + offsets.to(pos.dtype)[seg]
    elif offsets:
        pos = pos + int(offsets)
    return pos


def check_on_host(*tensors) -> bool:
    """Doors check positions against the table on the host only where that costs no device sync
    (CPU tensors), like the libraries they stand in for; on a GPU the kernels' guard (NaN for a
    position outside the table, never a read outside it) is the check."""
    return all(t is None or t.device.type == "cpu" for t in tensors)

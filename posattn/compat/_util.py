"""Helpers shared by the compat doors."""
from __future__ import annotations

import torch


def segment_positions(indptr: torch.Tensor, offsets, nnz: int, device) -> torch.Tensor:
    """Positions of a ragged batch: token t of segment i (indptr[i] <= t < indptr[i+1]) sits at
    ``t - indptr[i] + offsets[i]`` (``offsets`` a [batch] tensor or an int). No device sync."""
    t = torch.arange(nnz, device=device, dtype=indptr.dtype)
    seg = torch.searchsorted(indptr[1:].contiguous(), t, right=True)
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

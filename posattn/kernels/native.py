"""Shared helpers for the two pybind11 modules (posattn._C, posattn._cuda).

Both take raw pointers and strides as integers; this module turns torch
tensors into those integers.
"""
from __future__ import annotations

import importlib

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def load(name: str):
    """Import posattn.<name>, returning (module or None, reason)."""
    try:
        return importlib.import_module(f"posattn.{name}"), ""
    except ImportError as e:  # not built, or built against another Python
        return None, f"posattn.{name} is not built or failed to import ({e})"


def rope_tensor_args(x: torch.Tensor | None, out: torch.Tensor | None) -> list[int]:
    """[in_ptr, out_ptr, heads, in strides (b, s, h), out strides (b, s, h)] of [B,S,H,D] views."""
    if x is None:
        return []
    return [x.data_ptr(), out.data_ptr(), x.shape[2], x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2)]


def pos_strides(pos2: torch.Tensor) -> tuple[int, int]:
    """Strides of a [Bp, S] positions view; batch stride 0 when shared across the batch."""
    return (0 if pos2.shape[0] == 1 else pos2.stride(0)), pos2.stride(1)

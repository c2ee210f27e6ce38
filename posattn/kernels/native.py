"""Shared helpers for the two pybind11 modules (posattn._C, posattn._cuda).

Both take raw pointers and strides as integers; this module turns torch
tensors and the lowered RopeTables into those integers (the C++ side that
unpacks them is csrc/rope_args.h).
"""
from __future__ import annotations

import importlib

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
POS_CODE = {torch.int32: 0, torch.int64: 1, torch.float32: 2, torch.float64: 3}


def load(name: str):
    """Import posattn.<name>, returning (module or None, reason)."""
    try:
        return importlib.import_module(f"posattn.{name}"), ""
    except ImportError as e:  # not built, or built against another Python
        return None, f"posattn.{name} is not built or failed to import ({e})"


def rope_tensor_args(x: torch.Tensor | None, out: torch.Tensor | None) -> list[int]:
    """[in_ptr, out_ptr, heads, in strides (b, s, h), out strides (b, s, h)] of [B,S,H,D] views."""
    if x is None or x.shape[2] == 0:
        return []
    return [x.data_ptr(), out.data_ptr(), x.shape[2], x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2)]


def pos_strides(pos2: torch.Tensor) -> tuple[int, int]:
    """Strides of a [Bp, S] positions view; batch stride 0 when shared across the batch."""
    return (0 if pos2.shape[0] == 1 else pos2.stride(0)), pos2.stride(1)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def pos_args(pos3: torch.Tensor) -> list[int]:
    """[ptr, dtype code, axis stride, batch stride (0 when shared), seq stride] of [A, Bp, S]."""
    return [pos3.data_ptr(), POS_CODE[pos3.dtype], pos3.stride(0),
            0 if pos3.shape[1] == 1 else pos3.stride(1), pos3.stride(2)]


def freq_args(tables) -> list[int]:
    """[inv_freq ptr, rows, pair_axis ptr|0, pair_pos_scale ptr|0, pair_q_offset ptr|0]."""
    inv = tables.inv_freq
    rows = 1 if inv.dim() == 1 else inv.shape[0]
    return [inv.data_ptr(), rows, _ptr(tables.pair_axis), _ptr(tables.pair_pos_scale),
            _ptr(tables.pair_q_offset)]


def angle_args(angles: torch.Tensor) -> list[int]:
    """[ptr, rows, batch stride (0 when shared), seq stride, row stride (0 for one row)] of [Ba, S, Ha, R/2]."""
    return [angles.data_ptr(), angles.shape[2], 0 if angles.shape[0] == 1 else angles.stride(0),
            angles.stride(1), 0 if angles.shape[2] == 1 else angles.stride(2)]


def pick(q, qo, k, ko):
    """(x, its output): the tensor whose shape and dtype describe the launch (q unless it has no heads);
    (None, None) when there are no tokens (B * S == 0: nothing to launch, and the empty tensors'
    null data pointers must not reach the kernels)."""
    x = q if q is not None and q.shape[2] > 0 else k
    xo = qo if x is q else ko
    if x is not None and x.shape[0] * x.shape[1] == 0:
        return None, None
    return x, xo


def dims_args(x: torch.Tensor, rotary_dim: int, interleaved: bool, copy_tail: bool) -> list[int]:
    B, S, _, D = x.shape
    return [B, S, D, rotary_dim, int(interleaved), int(copy_tail)]


def copies_tail(x: torch.Tensor, xo: torch.Tensor, rotary_dim: int) -> bool:
    return rotary_dim < x.shape[3] and xo.data_ptr() != x.data_ptr()

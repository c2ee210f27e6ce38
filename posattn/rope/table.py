"""The per-call cos/sin table that fused kernels (anchor attention, the decode engine) read.

    table[0, t, p] = fp32(a * cos(theta)),  table[1, t, p] = fp32(a * sin(theta))
    theta = positions[t] * inv_freq[p],     a = attention_scaling

theta is reduced modulo 2*pi exactly, by the rotary kernels' own routine (position split at a
multiple of 4096, two-part 2*pi: ``rope_reduce`` in csrc/include/posattn/rope_math.h and
``_reduced_angle`` in posattn/kernels/triton/rope.py), so each backend's table holds exactly
the cos/sin that backend's ``apply_rope`` multiplies by. It is built once per call, in
O(T * R/2), and a fused kernel reads it instead of redoing fp64 work on every tile visit.
Integer positions are exact below 2^31.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpu" (posattn._C),
"reference" (fp64 torch, then one rounding to fp32: the oracle).
"""
from __future__ import annotations

import torch

POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
BACKENDS = ("triton", "cpu", "reference")


def _check(positions, inv_freq, attention_scaling, backend):
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor [T], got {type(positions).__name__}")
    if positions.dtype not in POS_DTYPES:
        raise TypeError(f"positions must be int32, int64, float32 or float64; got {positions.dtype}")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [T]; got shape {tuple(positions.shape)}")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype != torch.float32 or inv_freq.dim() != 1:
        raise TypeError("inv_freq must be a float32 tensor [R/2]; got "
                        + (f"{inv_freq.dtype} {tuple(inv_freq.shape)}" if isinstance(inv_freq, torch.Tensor)
                           else type(inv_freq).__name__))
    if inv_freq.device != positions.device:
        raise ValueError(f"inv_freq is on {inv_freq.device} but positions are on {positions.device}")
    if isinstance(attention_scaling, bool) or not isinstance(attention_scaling, (int, float)):
        raise TypeError(f"attention_scaling must be a number, got {type(attention_scaling).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def default_backend(device: torch.device) -> str:
    """The table builder for tensors on ``device``: Triton on a GPU, the C++ kernel on the CPU
    (the fp64 reference when posattn._C is not built)."""
    if device.type == "cuda":
        return "triton"
    from posattn.kernels import cpu as _cpu

    return "cpu" if _cpu.status()[0] else "reference"


def cos_sin_table(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0, *,
                  backend: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [2, T, R/2] (cos, sin) of ``positions`` [T] x ``inv_freq`` fp32 [R/2], times
    ``attention_scaling``, on the positions' device. No host synchronisation.

    ``backend``: "triton", "cpu" or "reference" (default: :func:`default_backend`); use the
    backend of the kernel that reads the table, so that it rotates exactly as that backend's
    ``apply_rope``. ``out``: an fp32 [2, T, R/2] contiguous buffer to fill (for graph capture).
    """
    backend = backend or default_backend(positions.device)
    _check(positions, inv_freq, attention_scaling, backend)
    T, half = positions.shape[0], inv_freq.shape[0]
    if out is None:
        out = torch.empty(2, T, half, dtype=torch.float32, device=positions.device)
    elif out.shape != (2, T, half) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor [2, {T}, {half}]; got {out.dtype} "
                         f"{tuple(out.shape)}")
    if T == 0 or half == 0:
        return out
    pos = positions.contiguous()
    inv = inv_freq.contiguous()
    if backend == "triton":
        from posattn.kernels.triton import rope_table as tk

        return tk.rope_table(pos, inv, float(attention_scaling), out)
    if backend == "cpu":
        from posattn.kernels import cpu as _cpu
        from posattn.kernels.native import POS_CODE

        if positions.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got {positions.device}")
        if _cpu._C is None:
            raise RuntimeError(f"the C++ module posattn._C is not available: {_cpu.status()[1]}")
        _cpu._C.rope_table(pos.data_ptr(), POS_CODE[pos.dtype], T, inv.data_ptr(), half,
                           float(attention_scaling), out.data_ptr(), torch.get_num_threads())
        return out
    from posattn.kernels.reference import rope as ref_rope

    ang = ref_rope.rope_angles(pos[None], inv)[0]                     # fp64 [T, R/2]
    a = float(attention_scaling)
    out[0].copy_(torch.cos(ang) * a)
    out[1].copy_(torch.sin(ang) * a)
    return out


def is_plain(tables) -> bool:
    """Whether a RopeTables is one inv_freq row [R/2] read at one position per token (no
    per-head rows, mrope sections or DPE): the case :func:`cos_sin_table` serves."""
    return (tables.inv_freq.dim() == 1 and tables.pair_axis is None and tables.pair_pos_scale is None)


def attention_tables(positions: torch.Tensor, tables, *, backend: str | None = None) -> torch.Tensor:
    """fp32 [n, 2, rows, T, R/2]: the cos/sin that fused attention reads, for any spec.

    ``positions``: [T], or [n_axes, T] with mrope sections; ``tables``: a RopeTables
    (posattn.lowered). ``rows`` is inv_freq's per-head row count (1 when shared: head h of a
    tensor with H heads reads row h // (H // rows)); ``n`` is 2 when DPE gives queries an offset
    (entry 0 for q, 1 for k), else 1 (both read entry 0). attention_scaling is folded in.

    The plain case (one row, no sections, no DPE) is :func:`cos_sin_table` with the backend's
    own kernel. The others evaluate the per-pair angles of posattn.kernels.reference.rope
    (axis selection, DPE floor and offset, the exact mod-2*pi reduction in fp64) on the
    positions' device and round cos/sin once to fp32: correctly rounded values, O(T * rows * R/2)
    once per call, no host synchronisation.
    """
    a = float(tables.attention_scaling)
    if is_plain(tables):
        pos = positions if positions.dim() == 1 else positions[0]
        return cos_sin_table(pos, tables.inv_freq.to(torch.float32).contiguous(), a, backend=backend)[None, :, None]
    from posattn.kernels.reference import rope as ref_rope

    pos3 = (positions if positions.dim() == 2 else positions[None])[:, None, :]      # [A, 1, T]
    outs = []
    for is_query in ((True, False) if tables.pair_q_offset is not None else (True,)):
        ang = ref_rope.rope_angles(pos3, tables, is_query)[0].transpose(0, 1)         # [rows, T, R/2]
        outs.append(torch.stack((torch.cos(ang) * a, torch.sin(ang) * a)).to(torch.float32))
    return torch.stack(outs).contiguous()

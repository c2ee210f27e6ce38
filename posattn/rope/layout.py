"""apply_rope's layouts, argument checks and kernel key (RopeKey): the helpers the public
ops (ops.py), their plans (plans.py) and custom ops (custom_ops.py) share.

Kernels see [B, S, H, D] views whose last dimension is contiguous: ``as_bshd`` makes them
from any layout ("bshd", "bhsd", packed "thd") without a copy, ``from_bshd`` goes back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn.lowered import RopeTables, token_bucket
from posattn.rope.spec import RopeSpec

LAYOUTS = ("bshd", "bhsd", "thd")
POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


@dataclass(frozen=True)
class RopeKey:
    """What the choice of kernel and launch config depends on."""

    device_type: str
    dtype: str
    head_dim: int
    rotary_dim: int
    interleaved: bool
    heads_q: int
    heads_k: int
    pos_dtype: str      # "int32" | "int64" | "float32" | "float64" | "angles"
    tokens_bucket: int  # next power of two of B*S (autotune shape bucket)
    n_axes: int = 1     # position axes read through pair_axis (multi-axis sections)
    rows: int = 1       # per-head inv_freq / angle rows (1: shared by all heads)
    dpe: bool = False   # dimension-wise positions (pair_pos_scale)



_DNAMES: dict = {}


def dname(dt: torch.dtype) -> str:
    n = _DNAMES.get(dt)
    if n is None:
        n = _DNAMES[dt] = str(dt).removeprefix("torch.")
    return n


def as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x
    if layout == "bhsd":
        return x.transpose(1, 2)
    return x.unsqueeze(0)  # thd -> [1, T, H, D]


def from_bshd(x4: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x4
    if layout == "bhsd":
        return x4.transpose(1, 2)
    return x4.squeeze(0)


def check_x(x, name, layout):
    want = 3 if layout == "thd" else 4
    if x.dim() != want:
        shape = "[T, H, D]" if want == 3 else "[B, S, H, D]" if layout == "bshd" else "[B, H, S, D]"
        raise ValueError(f"{name} must be {want}-D for layout={layout!r} ({shape}); "
                         f"got shape {tuple(x.shape)}")


def check_qk(q, k, layout):
    check_x(q, "q", layout)
    if k is not None:
        if k.dim() != q.dim():
            raise ValueError(f"k must be {q.dim()}-D like q for layout={layout!r}; got shape {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
        qs, ks = as_bshd(q, layout).shape, as_bshd(k, layout).shape
        for i, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if qs[i] != ks[i]:
                raise ValueError(f"k's {what} ({ks[i]}) must equal q's ({qs[i]}); "
                                 f"q shape {tuple(q.shape)}, k shape {tuple(k.shape)} (layout={layout!r})")


def positions_3d(positions: torch.Tensor, B: int, S: int, layout: str, n_axes: int,
                 name: str = "positions") -> torch.Tensor:
    """Positions as an [A, Bp, S] view (Bp in {1, B}), or a ValueError naming the argument."""
    if n_axes > 1:
        forms = "[n_axes, T]" if layout == "thd" else "[n_axes, S] or [n_axes, B, S]"
        if positions.dim() < 1 or positions.shape[0] != n_axes:
            raise ValueError(f"{name} must be {forms} with n_axes = {n_axes} (the spec has multi-axis "
                             f"sections); got shape {tuple(positions.shape)}")
        positions_2d(positions[0], B, S, layout, name, prefix="[n_axes] + ")
        return positions.unsqueeze(1) if positions.dim() == 2 else positions
    return positions_2d(positions, B, S, layout, name).unsqueeze(0)


def positions_2d(positions, B, S, layout, name, prefix=""):
    if layout == "thd":
        if positions.dim() != 1 or positions.shape[0] != S:
            raise ValueError(f"{name} must be {prefix}[T] = [{S}] for layout='thd'; "
                             f"got shape {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 1:
        if positions.shape[0] != S:
            raise ValueError(f"{name} of shape {prefix}[S] must have S = {S} (q's sequence length); "
                             f"got {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 2:
        if tuple(positions.shape) != (B, S) and tuple(positions.shape) != (1, S):
            raise ValueError(f"{name} of shape {prefix}[B, S] must be [{B}, {S}] (or [1, {S}]); "
                             f"got {tuple(positions.shape)}")
        return positions
    raise ValueError(f"{name} must be {prefix}[S] or {prefix}[B, S] (or {prefix}[T] for layout='thd'); "
                     f"got {positions.dim()}-D shape {tuple(positions.shape)}")


def pos_tensor(positions, name="positions"):
    V.tensor(positions, name)
    if positions.dtype not in POS_DTYPES:
        raise TypeError(f"{name} must be int32, int64, float32 or float64; got {positions.dtype}")
    return positions


def tables_for(spec: RopeSpec, device, positions, seq_len):
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    if getattr(spec, "depends_on_seq_len", False) and seq_len is None:
        if positions is None:
            raise ValueError("this spec's tables depend on the sequence length: pass seq_len= "
                             "(or positions) so the right tables are used")
        if torch.compiler.is_compiling():
            raise ValueError("this spec's tables depend on the sequence length (DynamicNTK, LongRoPE): under "
                             "torch.compile pass seq_len= (max(positions) + 1 is a value the trace cannot read)")
        # one host sync; pass seq_len= to avoid it
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
    return spec.tables(device, seq_len)


def check_rows(tables: RopeTables, HQ: int, HK: int):
    inv = tables.inv_freq
    rows = 1 if inv.dim() == 1 else inv.shape[0]
    for name, h in (("q", HQ), ("k", HK)):
        if h and h % rows:
            raise ValueError(f"the spec's per-head inv_freq has {rows} rows, which must divide {name}'s "
                             f"head count ({h}); head h uses row h // (heads // rows)")
    return rows


def pos_key_dtype(pos3):
    return dname(pos3.dtype)


def make_key(x4: torch.Tensor, HQ: int, HK: int, rotary_dim: int, interleaved: bool, pos_dtype: str,
             n_axes: int, rows: int, dpe: bool) -> RopeKey:
    B, S, _, D = x4.shape
    return RopeKey(x4.device.type, dname(x4.dtype), D, rotary_dim, interleaved, HQ, HK, pos_dtype,
                   token_bucket(B * S), n_axes, rows, dpe)


def new_like(x4: torch.Tensor) -> torch.Tensor:
    # same strides as the input when it is dense (so a bhsd input gives a bhsd output)
    out = torch.empty_like(x4)
    return out if out.stride(-1) == 1 else torch.empty(x4.shape, dtype=x4.dtype, device=x4.device)


def last_contig(x4: torch.Tensor) -> torch.Tensor:
    return x4 if x4.stride(-1) == 1 or x4.shape[-1] == 1 else x4.contiguous()

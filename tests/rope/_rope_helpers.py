"""Shared by the rotary tests: hand-built RopeTables (until the spec side produces
them), a spec that carries them, and an fp64 oracle written independently of
posattn's reference kernel."""
from __future__ import annotations

import dataclasses

import torch

import posattn
from posattn.lowered import RopeTables


class _Seen:
    """Records the seq_len each tables() call got (hashable by identity)."""

    def __init__(self):
        self.values = []


@dataclasses.dataclass(frozen=True)
class TableSpec(posattn.RopeSpec):
    """A RopeSpec whose lowering is given by hand (tests only)."""

    fixed: object = dataclasses.field(default=None, compare=False, hash=False)
    seq_len_dependent: bool = False
    seen: object = dataclasses.field(default_factory=_Seen, compare=False, hash=False)

    @property
    def seen_seq_len(self) -> list:
        return self.seen.values

    @property
    def depends_on_seq_len(self) -> bool:
        return self.seq_len_dependent

    def tables(self, device=None, seq_len=None):
        self.seen.values.append(seq_len)
        return self.fixed.to(device if device is not None else "cpu")

    def __hash__(self):
        return id(self)


def base_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base ** exps)


TABLE_KINDS = ("plain", "scaled", "mrope", "mrope_interleaved", "perhead", "dpe")


def make_tables(kind: str, rotary_dim: int, heads_k: int = 1) -> RopeTables:
    half = rotary_dim // 2
    inv = base_inv_freq(rotary_dim)
    if kind == "plain":
        return RopeTables(inv)
    if kind == "scaled":  # YaRN-like magnitude factor and a non-standard frequency table
        return RopeTables(inv * torch.linspace(0.5, 1.0, half), attention_scaling=0.75)
    if kind == "mrope":  # contiguous sections (t, h, w) as in Qwen2-VL, proportions 1:1.5:1.5
        t = half // 4
        h = (half - t) // 2
        axis = torch.tensor([0] * t + [1] * h + [2] * (half - t - h), dtype=torch.int32)
        return RopeTables(inv, pair_axis=axis, n_axes=3)
    if kind == "mrope_interleaved":  # Qwen3-VL style: pairs cycle through the axes
        axis = (torch.arange(half) % 3).to(torch.int32)
        return RopeTables(inv, pair_axis=axis, n_axes=3)
    if kind == "perhead":  # one frequency row per key head (GQA group)
        rows = torch.stack([inv * (1.0 + 0.1 * r) for r in range(heads_k)])
        return RopeTables(rows)
    if kind == "dpe":  # dimension-wise position groups with a query offset
        scale = torch.tensor([float(1 + (p * 3) // half) for p in range(half)])
        offset = torch.tensor([float((p * 3) // half) * 2.0 for p in range(half)])
        return RopeTables(inv, pair_pos_scale=scale, pair_q_offset=offset)
    raise ValueError(kind)


def oracle_angles(pos3: torch.Tensor, tables: RopeTables, is_query: bool) -> torch.Tensor:
    """fp64 angles [Bp, S, rows, R/2], pair by pair, from the contract in lowering.py."""
    inv = tables.inv_freq.double().cpu()
    if inv.dim() == 1:
        inv = inv[None]
    rows, half = inv.shape
    pos3 = pos3.cpu().double()
    Bp, S = pos3.shape[1], pos3.shape[2]
    out = torch.empty(Bp, S, rows, half, dtype=torch.float64)
    for p in range(half):
        axis = int(tables.pair_axis[p]) if tables.pair_axis is not None else 0
        pos = pos3[axis]
        if tables.pair_pos_scale is not None:
            pos = torch.floor(pos / float(tables.pair_pos_scale[p]))
            if is_query and tables.pair_q_offset is not None:
                pos = pos + float(tables.pair_q_offset[p])
        for r in range(rows):
            out[:, :, r, p] = pos * float(inv[r, p])
    return out


def oracle_rotate(x4: torch.Tensor, angles: torch.Tensor, rotary_dim: int, interleaved: bool,
                  scale: float = 1.0) -> torch.Tensor:
    """x4 [B, S, H, D], angles [B|1, S, rows, R/2] -> fp64 (differentiable)."""
    x = x4.double()
    H = x.shape[2]
    a = angles.double().repeat_interleave(H // angles.shape[2], dim=2)
    c, s = torch.cos(a) * scale, torch.sin(a) * scale
    half = rotary_dim // 2
    idx1 = torch.arange(half) * 2 if interleaved else torch.arange(half)
    idx2 = idx1 + 1 if interleaved else idx1 + half
    x1, x2 = x[..., idx1], x[..., idx2]
    out = x.clone()
    out[..., idx1] = x1 * c - x2 * s
    out[..., idx2] = x2 * c + x1 * s
    return out


def to_bshd(x, layout):
    return {"bshd": x, "bhsd": x.transpose(1, 2), "thd": x.unsqueeze(0)}[layout]


def from_bshd(x, layout):
    return {"bshd": x, "bhsd": x.transpose(1, 2), "thd": x.squeeze(0)}[layout]


def pos_3d(positions, n_axes, layout):
    if n_axes == 1:
        positions = positions[None]
    return positions.unsqueeze(1) if positions.dim() == 2 else positions


def oracle(q, k, positions, spec, layout="bshd", tables=None):
    """fp64 apply_rope of q and k (any layout), independent of posattn's reference kernel."""
    tables = tables if tables is not None else spec.tables("cpu")
    pos3 = pos_3d(positions, tables.n_axes, layout)
    a = float(tables.attention_scaling)
    qo = from_bshd(oracle_rotate(to_bshd(q, layout).cpu(), oracle_angles(pos3, tables, True),
                                 spec.rotary_dim, spec.interleaved, a), layout)
    ko = None
    if k is not None:
        ko = from_bshd(oracle_rotate(to_bshd(k, layout).cpu(), oracle_angles(pos3, tables, False),
                                     spec.rotary_dim, spec.interleaved, a), layout)
    return qo, ko


def positions_for(n_axes, layout, B, S, dtype, device, batched, max_pos=4096):
    T = B * S
    shape = (T,) if layout == "thd" else ((B, S) if batched else (S,))
    if n_axes > 1:
        shape = (n_axes,) + shape
    if dtype.is_floating_point:
        return (torch.rand(shape, device=device) * max_pos).to(dtype)
    return torch.randint(0, max_pos, shape, dtype=dtype, device=device)


def rand_qk(layout, B, S, HQ, HK, D, dtype, device):
    if layout == "thd":
        mk = lambda h: torch.randn(B * S, h, D, dtype=dtype, device=device)  # noqa: E731
    elif layout == "bshd":
        mk = lambda h: torch.randn(B, S, h, D, dtype=dtype, device=device)  # noqa: E731
    else:
        mk = lambda h: torch.randn(B, h, S, D, dtype=dtype, device=device)  # noqa: E731
    return mk(HQ), (mk(HK) if HK else None)


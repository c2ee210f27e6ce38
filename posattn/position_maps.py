"""Relative-position maps: the rotation of each (query i, key j) pair chosen per pair.

With RoPE, the score of a pair depends on the distance d = p_i - p_j alone:
(R(p_i) q) . (R(p_j) k) = q . R(p_j - p_i) k. A position map changes the distance of some
pairs, so keys must be kept *before* RoPE and rotated inside the kernel (a cache written by
``rope_and_cache(..., rotate_k=False)``). Every map here has the same shape: a pair is either

    near:  q rotated at p_i,       k rotated at p_j           (plain RoPE)
    far:   q rotated at far_q(i),  k rotated at far_k(j)

so a kernel needs at most two products per tile (near and far), and only for tiles that
straddle the boundary between the two. The maps (d = p_i - p_j, W = window):

=================  ===========================  ==================  ==================
map                far when                     far_q(i)            far_k(j)
=================  ===========================  ==================  ==================
ReRoPE(W)          d >= W                       W                   0
LeakyReRoPE(W, s)  d >= W                       p_i/s + W - W/s     p_j/s
SelfExtend(G, W)   d >= W                       p_i//G + W - W//G   p_j//G
VistaRoPE(visual)  not visual[i], visual[j]     0                   0
=================  ===========================  ==================  ==================

so the far distance is W (ReRoPE), W + (d - W)/s (Leaky ReRoPE), ``p_i//G - p_j//G + W - W//G``
(SelfExtend, "LLM Maybe LongLM") and 0 -- no rotation -- for a text query and a visual key
(Vista-LLaMA). A map with float results (Leaky ReRoPE) uses float positions: its far positions
are computed in fp64 and rounded once to fp32, as float positions are everywhere in posattn;
the others are integers (exact for integer positions).

Positions are one axis (``[T]``-shaped per op); multi-axis (M-RoPE) and DPE specs are refused
with a map. Each map is a hashable spec (VistaRoPE hashes by identity: it holds a tensor).
:func:`pair_positions` is the oracle's helper: for every pair the two positions at which q and
k are rotated, in fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Kernel codes of the maps (scalar launch arguments; 0 = no map).
NONE, RE_ROPE, LEAKY_RE_ROPE, SELF_EXTEND, VISTA = 0, 1, 2, 3, 4


def _int_at_least(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


class PositionMap:
    """Base of the maps. ``code``, ``window`` and ``param`` are the kernels' scalar arguments."""

    code: int = NONE

    # --- what a kernel needs -------------------------------------------------------------
    @property
    def param(self) -> float:
        """Leaky ReRoPE's scale, SelfExtend's group; 0 otherwise."""
        return 0.0

    @property
    def window_or_zero(self) -> int:
        return getattr(self, "window", 0)

    @property
    def float_positions(self) -> bool:
        """Whether far positions are fractional (then fp32 tensors, else int64)."""
        return False

    def far_q(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [...] -> the far rotation position of each query (int64 or fp32)."""
        raise NotImplementedError

    def far_k(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [...] -> the far rotation position of each key (int64 or fp32)."""
        raise NotImplementedError

    def is_far(self, pos_q: torch.Tensor, pos_k: torch.Tensor, vis_q: torch.Tensor | None = None,
               vis_k: torch.Tensor | None = None) -> torch.Tensor:
        """bool, broadcast of pos_q and pos_k (e.g. [Tq, 1] and [1, Tk]): pairs that use the far
        rotation. ``vis_q``/``vis_k`` (bool, same shapes) are VistaRoPE's visual flags."""
        d = pos_q.to(torch.float64) - pos_k.to(torch.float64)
        return d >= self.window

    # --- host-side helpers -----------------------------------------------------------------
    def _int_or_float(self, x64: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.float_positions or positions.is_floating_point():
            return x64.to(torch.float32)
        return x64.to(torch.int64)


@dataclass(frozen=True)
class ReRoPE(PositionMap):
    """ReRoPE: distance d for d < window, else window (q rotated at window, k not rotated)."""

    window: int
    code = RE_ROPE

    def __post_init__(self):
        _int_at_least(self.window, "window", 1)

    def far_q(self, positions):
        return self._int_or_float(torch.full_like(positions, self.window, dtype=torch.float64), positions)

    def far_k(self, positions):
        return self._int_or_float(torch.zeros_like(positions, dtype=torch.float64), positions)


@dataclass(frozen=True)
class LeakyReRoPE(PositionMap):
    """Leaky ReRoPE: d for d < window, else window + (d - window) / scale (float positions)."""

    window: int
    scale: float
    code = LEAKY_RE_ROPE

    def __post_init__(self):
        _int_at_least(self.window, "window", 1)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale must be a number, got {type(self.scale).__name__}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")

    @property
    def param(self) -> float:
        return float(self.scale)

    @property
    def float_positions(self) -> bool:
        return True

    def far_q(self, positions):
        s, w = float(self.scale), float(self.window)
        return (positions.to(torch.float64) / s + (w - w / s)).to(torch.float32)

    def far_k(self, positions):
        return (positions.to(torch.float64) / float(self.scale)).to(torch.float32)


@dataclass(frozen=True)
class SelfExtend(PositionMap):
    """SelfExtend ("LLM Maybe LongLM"): d for d < window, else the grouped distance
    ``p_i//group - p_j//group + window - window//group``. Float positions are floored."""

    group: int
    window: int
    code = SELF_EXTEND

    def __post_init__(self):
        _int_at_least(self.group, "group", 1)
        _int_at_least(self.window, "window", 1)

    @property
    def param(self) -> float:
        return float(self.group)

    def far_q(self, positions):
        g, w = self.group, self.window
        return self._int_or_float(torch.floor(positions.to(torch.float64) / g) + (w - w // g), positions)

    def far_k(self, positions):
        return self._int_or_float(torch.floor(positions.to(torch.float64) / self.group), positions)


@dataclass(frozen=True, eq=False)
class VistaRoPE(PositionMap):
    """Vista-LLaMA: a text query and a visual key are scored without rotation (equal distance
    to every visual token); all other pairs as RoPE.

    Args:
        visual: bool tensor, True for visual tokens. What it indexes is the op's: the packed
            tokens ``[T]`` for anchor_attention; the logical cache slots ``[B, S]`` (new tokens at
            ``cache_seqlens[b] + i``) for decode_attention and select.scores.
    """

    visual: torch.Tensor = field(repr=False)
    code = VISTA

    def __post_init__(self):
        if not isinstance(self.visual, torch.Tensor):
            raise TypeError(f"visual must be a bool torch.Tensor, got {type(self.visual).__name__}")
        if self.visual.dtype != torch.bool:
            raise TypeError(f"visual must be a bool tensor (True for visual tokens), got {self.visual.dtype}")

    @property
    def window_or_zero(self) -> int:
        return 0

    def far_q(self, positions):
        return self._int_or_float(torch.zeros_like(positions, dtype=torch.float64), positions)

    far_k = far_q

    def is_far(self, pos_q, pos_k, vis_q=None, vis_k=None):
        if vis_q is None or vis_k is None:
            raise ValueError("VistaRoPE.is_far needs the visual flags of the queries and keys")
        return ~vis_q & vis_k

    def check_visual(self, shape: tuple, device: torch.device, what: str) -> torch.Tensor:
        """The visual mask, checked to have ``shape`` (what it indexes: ``what``) and device."""
        if tuple(self.visual.shape) != tuple(shape):
            raise ValueError(f"position_map=VistaRoPE(visual): visual must have shape {tuple(shape)} ({what}), "
                             f"got {tuple(self.visual.shape)}")
        if self.visual.device != device:
            raise ValueError(f"position_map=VistaRoPE(visual): visual is on {self.visual.device} but the "
                             f"inputs are on {device}")
        return self.visual


MAPS = (ReRoPE, LeakyReRoPE, SelfExtend, VistaRoPE)


def check_position_map(position_map, rope) -> PositionMap | None:
    """None, or the map after checking that it is a map and that ``rope`` is given and single-axis."""
    if position_map is None:
        return None
    if not isinstance(position_map, PositionMap):
        raise TypeError(f"position_map must be one of posattn.ReRoPE, LeakyReRoPE, SelfExtend, VistaRoPE or "
                        f"None; got {type(position_map).__name__}")
    if rope is None:
        raise ValueError("position_map needs rope=: the map chooses each pair's rotation, so q and the "
                         "(pre-RoPE) keys are rotated inside the kernel")
    if getattr(rope, "mrope_section", None) or getattr(rope, "dpe", None) is not None:
        raise ValueError("position_map works on one position axis; rope has mrope_section or dpe "
                         "(multi-axis distances are not defined by the maps)")
    return position_map


def pair_positions(m: PositionMap, pos_q: torch.Tensor, pos_k: torch.Tensor,
                   vis_q: torch.Tensor | None = None, vis_k: torch.Tensor | None = None):
    """The oracle's view: fp64 ``(a, b)`` of shape [Tq, Tk], the positions at which q_i and k_j are
    rotated for pair (i, j) (near: p_i, p_j; far: far_q(i), far_k(j), as the kernels round them).

    Args:
        pos_q: [Tq] query positions; pos_k: [Tk] key positions (int or float).
        vis_q, vis_k: VistaRoPE's visual flags of the queries [Tq] and keys [Tk].
    """
    far = m.is_far(pos_q[:, None], pos_k[None, :],
                   None if vis_q is None else vis_q[:, None], None if vis_k is None else vis_k[None, :])
    pq, pk = pos_q.to(torch.float64), pos_k.to(torch.float64)
    fq, fk = m.far_q(pos_q).to(torch.float64), m.far_k(pos_k).to(torch.float64)
    a = torch.where(far, fq[:, None], pq[:, None])
    b = torch.where(far, fk[None, :], pk[None, :])
    return a, b


def tile_kinds(m: PositionMap, q_lo, q_hi, k_lo, k_hi):
    """For a tile whose query positions lie in [q_lo, q_hi] and key positions in [k_lo, k_hi]
    (tensors or numbers), which products it needs: (near, far) bools. Distance maps only:
    near unless min d >= W, far unless max d < W. VistaRoPE tiles need the flags (both)."""
    if isinstance(m, VistaRoPE):
        return True, True
    dmin, dmax = q_lo - k_hi, q_hi - k_lo
    return dmin < m.window, dmax >= m.window


# --- the attention kernels' view (added for anchor_attention; definitions above unchanged) --------


def kernel_args(m: PositionMap | None) -> tuple[int, int, float, torch.Tensor | None]:
    """(code, window, param, visual or None) of a map: the scalars a torch.library op takes
    (0, 0, 0.0, None without a map). :func:`from_kernel_args` rebuilds the map."""
    if m is None:
        return NONE, 0, 0.0, None
    return m.code, int(m.window_or_zero), float(m.param), m.visual if isinstance(m, VistaRoPE) else None


def from_kernel_args(code: int, window: int, param: float, visual: torch.Tensor | None) -> PositionMap | None:
    """The map of :func:`kernel_args`' tuple (None for code 0)."""
    if code == NONE:
        return None
    if code == RE_ROPE:
        return ReRoPE(int(window))
    if code == LEAKY_RE_ROPE:
        return LeakyReRoPE(int(window), float(param))
    if code == SELF_EXTEND:
        return SelfExtend(int(round(param)), int(window))
    if code == VISTA:
        return VistaRoPE(visual)
    raise ValueError(f"unknown position map code {code}")


def far_pairs(m: PositionMap, pos_q: torch.Tensor, pos_k: torch.Tensor, vis_q: torch.Tensor | None = None,
              vis_k: torch.Tensor | None = None) -> torch.Tensor:
    """bool [Tq, Tk]: the pairs of ``pos_q`` [Tq] x ``pos_k`` [Tk] that take the far rotation
    (VistaRoPE: from ``vis_q`` [Tq], ``vis_k`` [Tk])."""
    return m.is_far(pos_q[:, None], pos_k[None, :], None if vis_q is None else vis_q[:, None],
                    None if vis_k is None else vis_k[None, :])

"""Lowered data that kernels read: what a RopeSpec lowers to (RopeTables).

A leaf module: it imports nothing of posattn, so kernels (posattn/kernels/*) and
lowering code (posattn/attention/masks.py) can import it without importing the ops.

Contract between the spec side (posattn/rope/spec.py, scaling.py) and the
kernels (posattn/kernels/*): kernels see only a RopeTables, never a spec.

Angle of rotary pair p for a token (all in fp32 or better, reduced mod 2*pi in fp64):

    axis   = pair_axis[p]            if pair_axis is not None else 0
    pos    = positions[axis, token]  (int or float positions)
    if pair_pos_scale is not None:   (dimension-wise positions, DPE)
        pos = floor(pos / pair_pos_scale[p])
        if the tensor is a query and pair_q_offset is not None:
            pos = pos + pair_q_offset[p]
    theta  = pos * inv_freq[head or 0, p]
    cos, sin = attention_scaling * cos(theta), attention_scaling * sin(theta)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class RopeTables:
    inv_freq: torch.Tensor                    # fp32 [R/2], or [H, R/2] per head
    attention_scaling: float = 1.0
    pair_axis: torch.Tensor | None = None     # int32 [R/2]: positions axis each pair reads
    n_axes: int = 1                           # positions carry this many axes when > 1
    pair_pos_scale: torch.Tensor | None = None  # fp32 [R/2]: DPE divisor per pair
    pair_q_offset: torch.Tensor | None = None   # fp32 [R/2]: DPE query offset per pair

    def to(self, device) -> "RopeTables":
        def mv(t):
            return None if t is None else t.to(device).contiguous()

        return RopeTables(mv(self.inv_freq), self.attention_scaling, mv(self.pair_axis), self.n_axes,
                          mv(self.pair_pos_scale), mv(self.pair_q_offset))


def token_bucket(n: int) -> int:
    """The power-of-two bucket of a token count (1 for n <= 1): kernel keys and tuned
    configs are keyed by it, so nearby sizes share one choice."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

"""Reference rotary embedding in fp64, written for clarity (the oracle of every backend).

For pair p of head h of the token at (b, s), with the lowered RopeTables:

    axis   = pair_axis[p] (0 without sections);   pos = positions[axis, b, s]
    DPE:     pos = floor(pos / pair_pos_scale[p]) (+ pair_q_offset[p] for queries)
    theta  = pos * inv_freq[row(h), p]             row(h) = h // (H // rows)
    or theta = angles[b, s, row(h), p]             (apply_rope_angles)
    half-split: (x[p], x[p + R/2]);  interleaved: (x[2p], x[2p+1])
    out1 = a (x1 cos - x2 sin);  out2 = a (x2 cos + x1 sin),  a = attention_scaling,
    with sin negated for sign = -1; dims >= R unchanged.

Everything is differentiable with torch's autograd (the tests' gradient oracle).
"""
from __future__ import annotations

import math

import torch


def rope_positions(pos3: torch.Tensor, tables, is_query: bool) -> torch.Tensor:
    """[A, Bp, S] positions -> fp64 per-pair positions [Bp, S, R/2]."""
    half = tables.inv_freq.shape[-1]
    pos = pos3.to(torch.float64)
    if tables.pair_axis is not None:
        pos = pos[tables.pair_axis.long().to(pos.device)]            # [R/2, Bp, S]
        pos = pos.permute(1, 2, 0)
    else:
        pos = pos[0][..., None].expand(*pos.shape[1:], half)
    if tables.pair_pos_scale is not None:
        pos = torch.floor(pos / tables.pair_pos_scale.to(pos.device, torch.float64))
        if is_query and tables.pair_q_offset is not None:
            pos = pos + tables.pair_q_offset.to(pos.device, torch.float64)
    return pos


def rope_angles(pos3: torch.Tensor, tables, is_query: bool = True) -> torch.Tensor:
    """fp64 angles [Bp, S, rows, R/2] (rows = 1, or inv_freq's per-head rows).

    Also accepts the plain form ``rope_angles(pos2 [Bp, S], inv_freq [R/2])`` and then
    returns [Bp, S, R/2] (used by the attention reference).
    """
    if isinstance(tables, torch.Tensor):
        from posattn.lowered import RopeTables

        return rope_angles(pos3[None], RopeTables(tables), is_query)[:, :, 0, :]
    pos = rope_positions(pos3, tables, is_query)
    inv = tables.inv_freq.to(pos.device, torch.float64)
    if inv.dim() == 1:
        inv = inv[None]
    # pos = hi + lo with hi a multiple of 4096: both products with the 24-bit
    # inv_freq are exact in fp64, so the reduced angle stays within ~1e-7 rad of
    # exact up to 2^31 (a plain fp64 product would err by ~2e-7 there)
    pos = pos[:, :, None, :]
    hi = torch.floor(pos / 4096.0) * 4096.0
    two_pi = 2.0 * math.pi
    return torch.remainder(hi * inv, two_pi) + torch.remainder((pos - hi) * inv, two_pi)


def rotate(x: torch.Tensor, angles: torch.Tensor, rotary_dim: int, interleaved: bool,
           scale: float = 1.0, sign: float = 1.0) -> torch.Tensor:
    """x: [B, S, H, D]; angles: [B or 1, S, rows, R/2] with rows dividing H (or [B or 1, S, R/2],
    shared by all heads) -> fp64 [B, S, H, D]."""
    x = x.to(torch.float64)
    angles = angles.to(torch.float64)
    if angles.dim() == 3:
        angles = angles[:, :, None, :]
    H, rows = x.shape[2], angles.shape[2]
    if rows != H:
        angles = angles.repeat_interleave(H // rows, dim=2)
    cos = torch.cos(angles) * scale
    sin = torch.sin(angles) * (scale * sign)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def _present(x):
    return x is not None and x.shape[2] > 0


def rope_forward(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    """Backend entry with the same contract as the native kernels (writes qo, ko)."""
    scale = float(tables.attention_scaling)
    if _present(q):
        qo.copy_(rotate(q, rope_angles(pos3, tables, True), rotary_dim, interleaved, scale, sign))
    if _present(k):
        ko.copy_(rotate(k, rope_angles(pos3, tables, False), rotary_dim, interleaved, scale, sign))


def rope_angles_forward(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float,
                        config: dict):
    if _present(q):
        qo.copy_(rotate(q, angles, rotary_dim, interleaved, 1.0, sign))
    if _present(k):
        ko.copy_(rotate(k, angles, rotary_dim, interleaved, 1.0, sign))

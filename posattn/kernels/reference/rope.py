"""Reference rotary embedding in fp64.

    theta[t, p] = position[t] * inv_freq[p]              (fp64)
    half-split: (x[p], x[p + R/2]);  interleaved: (x[2p], x[2p+1])
    out1 = x1 cos(theta) - x2 sin(theta);  out2 = x2 cos(theta) + x1 sin(theta)
    dims >= R (rotary_dim) unchanged
"""
from __future__ import annotations

import torch


def rope_angles(pos2: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[Bp, S] positions x [R/2] inv_freq -> fp64 angles [Bp, S, R/2]."""
    return pos2.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def rotate(x: torch.Tensor, angles: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """x: [B, S, H, D] (any float dtype); angles: [B or 1, S, R/2] -> fp64 [B, S, H, D]."""
    x = x.to(torch.float64)
    cos = torch.cos(angles)[:, :, None, :]
    sin = torch.sin(angles)[:, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def rope_forward(q, qo, k, ko, pos2, inv_freq, rotary_dim: int, interleaved: bool, config: dict):
    """Backend entry with the same contract as the native kernels (writes qo, ko)."""
    ang = rope_angles(pos2, inv_freq)
    qo.copy_(rotate(q, ang, rotary_dim, interleaved))
    if k is not None:
        ko.copy_(rotate(k, ang, rotary_dim, interleaved))

"""Reference rotary embedding from cos/sin tables, in fp64.

Tables are four [Bt, N, R/2] views (cos and sin of the first and of the
second element of each rotary pair; the second-half views are the same as
the first-half ones for the usual half tables). Row of token (b, s):

    row = positions[b, s] if positions is given else s;  table batch = b if Bt > 1 else 0

    o1 = x1 * cos1[row, p] - x2 * sin1[row, p]
    o2 = x2 * cos2[row, p] + x1 * sin2[row, p]          (times ``sign`` on both sins)

    half-split pairs (p, p + R/2), interleaved pairs (2p, 2p + 1); dims >= R unchanged.
    A row outside [0, N) gives NaN in the rotated dims (kernels never read outside the table).
"""
from __future__ import annotations

import torch


def gather_rows(t: torch.Tensor, pos2: torch.Tensor | None, B: int, S: int) -> torch.Tensor:
    """[Bt, N, R/2] table -> fp64 [B, S, R/2] rows for each token; NaN for rows out of range."""
    t = t.to(torch.float64)
    Bt, N, half = t.shape
    if pos2 is None:
        rows = torch.arange(S, device=t.device).expand(B, S)
    else:
        rows = pos2.to(torch.int64).expand(B, S)
    valid = (rows >= 0) & (rows < N)
    safe = torch.where(valid, rows, torch.zeros_like(rows))
    tb = t.expand(B, N, half) if Bt == 1 else t
    out = torch.gather(tb, 1, safe[..., None].expand(B, S, half))
    return torch.where(valid[..., None], out, torch.full_like(out, float("nan")))


def rotate_tables(x, c1, s1, c2, s2, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """x: [B, S, H, D]; c*/s*: fp64 [B, S, R/2] -> fp64 [B, S, H, D]."""
    x = x.to(torch.float64)
    c1, s1, c2, s2 = (t[:, :, None, :] for t in (c1, s1, c2, s2))
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    return torch.cat((out, rest), dim=-1)


def rope_cos_sin_forward(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim: int, interleaved: bool,
                         sign: float, config: dict):
    """Backend entry with the same contract as the native kernels (writes qo, ko)."""
    B, S = q.shape[0], q.shape[1]
    rows = [gather_rows(t, pos2, B, S) for t in (c1, s1, c2, s2)]
    rows[1] = rows[1] * sign
    rows[3] = rows[3] * sign
    qo.copy_(rotate_tables(q, *rows, rotary_dim, interleaved))
    if k is not None:
        ko.copy_(rotate_tables(k, *rows, rotary_dim, interleaved))

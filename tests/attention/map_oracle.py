"""The fp64 oracle of anchor attention with a relative-position map, built pair by pair.

For every pair (i, j), posattn.position_maps.pair_positions gives the two positions a_ij, b_ij
at which q_i and k_j are rotated; this oracle rotates q_i by a_ij and k_j by b_ij explicitly
(cos/sin of position x inv_freq in fp64: the products of an integer or fp32 position and an
fp32 frequency are exact in fp64, so the angles are exact before the library cos/sin), scores
the pair, and lets autograd differentiate. Nothing here goes through the near/far split the
kernels use. The mask is tests/attention/oracle.py's pair-by-pair rule. Small T only.
"""
from __future__ import annotations

import math

import torch

from posattn.position_maps import VistaRoPE, pair_positions
from tests.attention import oracle


def pair_rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, interleaved: bool,
                scaling: float) -> torch.Tensor:
    """x: [N, H, D] fp64 broadcast to pos [Tq, Tk] -> [Tq, Tk, H, D]: x rotated at pos (each pair's own
    angle). x is the query side ([Tq, 1, H, D] view) or the key side ([1, Tk, H, D])."""
    half = rotary_dim // 2
    ang = pos[..., None] * inv_freq.to(torch.float64)[None, None, :]          # [Tq, Tk, R/2], exact
    c, s = (torch.cos(ang) * scaling)[:, :, None, :], (torch.sin(ang) * scaling)[:, :, None, :]
    i1 = torch.arange(half) * 2 if interleaved else torch.arange(half)
    i2 = i1 + 1 if interleaved else i1 + half
    x = x.expand(pos.shape[0], pos.shape[1], *x.shape[2:])
    x1, x2 = x[..., i1], x[..., i2]
    out = x.clone()
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x2 * c + x1 * s
    return out


def run(q, k, v, cu, rows, na, causal, window, rope, position_map, dout=None, dlse=None, scale=None,
        qk_precision="bf16", bf16_truncates=False, split_grad_operand=False):
    """fp64 (out, lse, grads or None, bounds) of anchor attention with ``position_map``.

    rope: (positions [T], inv_freq fp32 [R/2], rotary_dim, interleaved, attention_scaling).
    With 16-bit inputs and qk_precision "bf16" each pair's rotated q and k are rounded to the
    input dtype (as the kernels round their rotated tiles); bounds as oracle.bounds, per pair."""
    dtype = q.dtype
    T, HQ, D = q.shape
    HK = k.shape[1]
    g = HQ // HK
    scale = D ** -0.5 if scale is None else scale
    leaves = [x.detach().cpu().to(torch.float64).requires_grad_(True) for x in (q, k, v)]
    mask = oracle.allowed_mask(T, cu.tolist(), None if rows is None else rows.tolist(), na, causal, window)
    pos, inv_freq, rd, inter, scaling = rope
    pos = pos.cpu()
    vis = position_map.visual.cpu() if isinstance(position_map, VistaRoPE) else None
    a, b = pair_positions(position_map, pos, pos, vis, vis)                   # [T, T] fp64
    qp = pair_rotate(leaves[0][:, None], a, inv_freq.cpu(), rd, inter, scaling)           # [i, j, Hq, D]
    kp = pair_rotate(leaves[1][None, :], b, inv_freq.cpu(), rd, inter, scaling)           # [i, j, Hk, D]
    if dtype in (torch.float16, torch.bfloat16) and qk_precision == "bf16":
        qp, kp = oracle.round_like(qp, dtype, bf16_truncates), oracle.round_like(kp, dtype, bf16_truncates)
    kp = kp.repeat_interleave(g, dim=2)
    s = torch.einsum("ijhd,ijhd->hij", qp, kp) * scale
    s = s.masked_fill(~mask[None], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~mask[None], 0.0)
    vv = leaves[2].repeat_interleave(g, dim=1)
    out = torch.einsum("hij,jhd->ihd", p, vv)
    grads = None
    if dout is not None:
        outs, gs = [out], [dout.detach().cpu().to(torch.float64)]
        if dlse is not None:
            outs.append(lse)
            gs.append(dlse.detach().cpu().to(torch.float64))
        grads = torch.autograd.grad(outs, leaves, gs)
    dd = dout if dout is not None else torch.zeros_like(out)
    bnd = pair_bounds(qp.detach(), kp.detach(), leaves[2].detach(), mask, scale, out.detach(),
                      dd.detach().cpu(), None if dlse is None else dlse.detach().cpu(), dtype, HK,
                      qk_eps=oracle.QK_EPS[qk_precision],
                      grad_operand=split_grad_operand and dtype in (torch.float16, torch.bfloat16))
    # dq, dk are rotated back by each pair's rotation: |R^T e| mixes each rotary pair with
    # |cos|, |sin| <= attention_scaling
    ones = torch.full((T, rd // 2), float(scaling), dtype=torch.float64)
    b_dq, b_dk = (oracle.rotate_bound(x, ones, ones, rd, inter) for x in bnd[2:4])
    return out.detach(), lse.detach(), grads, (bnd[0], bnd[1], b_dq, b_dk, bnd[4])


def pair_bounds(qp, kp, v, mask, scale, out, dout, dlse, dtype, HK, qk_eps=0.0, grad_operand=False):
    """oracle.bounds with per-pair rotated operands qp, kp [Tq, Tk, Hq, D] (kp repeated over the
    GQA group). The |dq| and |dk| terms of the rotated-frame gradients (two frames per token here)
    are bounded by scale sum |ds| |k| (resp. |q|), which is >= either frame's |dq|."""
    T, _, HQ, D = qp.shape
    g = HQ // HK
    u, u32, n32 = oracle.unit_roundoff(dtype), 2.0 ** -24, 2.0 * D
    grp = lambda x: x.reshape(T, HK, g, D).sum(2)  # noqa: E731
    with torch.no_grad():
        vv = v.repeat_interleave(g, 1)
        s = torch.einsum("ijhd,ijhd->hij", qp, kp) * scale
        sigma = torch.einsum("ijhd,ijhd->hij", qp.abs(), kp.abs()) * scale
        s = s.masked_fill(~mask[None], -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~mask[None], 0.0)
        ps = p * (1 + sigma + (qk_eps / (n32 * u32)) * sigma)
        va, oa = vv.abs(), out.abs()
        A = torch.einsum("hij,jhd->ihd", p, va)
        B = torch.einsum("hij,jhd->ihd", ps, va) + ps.sum(-1).transpose(0, 1)[..., None] * oa
        b_out = 4 * u * (A + oa) + n32 * u32 * B
        b_lse = n32 * u32 * (lse.abs().nan_to_num(0.0, 0.0, 0.0) + ps.sum(-1))
        do = dout.to(torch.float64)
        doa = do.abs()
        dp = torch.einsum("ihd,jhd->hij", do, vv)
        delta = (do * out).sum(-1).transpose(0, 1)[..., None]
        if dlse is not None:
            delta = delta - dlse.to(torch.float64)[..., None]
        ds = p * (dp - delta)
        dsa = ds.abs() + p * (doa * oa).sum(-1).transpose(0, 1)[..., None]
        E = torch.einsum("ihd,jhd->hij", doa, va) + delta.abs()
        pe = ps * E
        dv = grp(torch.einsum("hij,ihd->jhd", p, do))
        ka, qa = kp.abs(), qp.abs()
        dq_abs = torch.einsum("hij,ijhd->ihd", ds.abs(), ka) * scale
        dk_abs = grp(torch.einsum("hij,ijhd->jhd", ds.abs(), qa) * scale)
        b_dv = 4 * u * (grp(torch.einsum("hij,ihd->jhd", p, doa)) + dv.abs()) \
            + n32 * u32 * grp(torch.einsum("hij,ihd->jhd", ps, doa))
        ug = (6 if grad_operand else 4) * u
        b_dq = ug * (torch.einsum("hij,ijhd->ihd", dsa, ka) * scale + dq_abs) \
            + n32 * u32 * torch.einsum("hij,ijhd->ihd", pe, ka) * scale
        b_dk = ug * (grp(torch.einsum("hij,ijhd->jhd", dsa, qa)) * scale + dk_abs) \
            + n32 * u32 * grp(torch.einsum("hij,ijhd->jhd", pe, qa)) * scale
    return b_out, b_lse, b_dq, b_dk, b_dv

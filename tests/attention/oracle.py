"""An oracle for anchor attention built independently of posattn's reference backend.

The mask is evaluated pair by pair from the rule documented in posattn/attention/masks.py,
with plain Python loops over the boundary lists (no searchsorted, no build_mask); rotary
angles are computed with mpmath at 40 digits (exact reduction of position x inv_freq, no
shared routine); attention is written out in fp64 torch ops here, differentiable by autograd.
Small T only.
"""
from __future__ import annotations

import math

import mpmath
import torch


def _segment_starts(boundaries: list[int], T: int) -> list[int]:
    """For each token, the first token of the (non-empty) segment holding it."""
    start = [0] * T
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        for t in range(a, b):
            start[t] = a
    return start


def allowed_mask(T: int, cu_seqlens, cu_rows=None, num_anchors: int = 1, causal: bool = True,
                 window: int | None = None) -> torch.Tensor:
    """bool [T, T] from the documented rule, one pair at a time:

        allowed(i, j) = (doc(i) == doc(j) and order(i, j) and in_window(i, j))
                        or (row(i) == row(j) and j < row_start(i) + num_anchors and order(i, j))
    """
    cs = [int(x) for x in cu_seqlens]
    cr = [0, T] if cu_rows is None else [int(x) for x in cu_rows]
    doc = _segment_starts(cs, T)
    row = _segment_starts(cr, T)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            order = j <= i if causal else True
            if window is None:
                in_win = True
            else:
                in_win = (i - j < window) if causal else (abs(i - j) < window)
            same_doc = doc[i] == doc[j] and order and in_win
            anchor = row[i] == row[j] and j < row[i] + num_anchors and order
            m[i, j] = same_doc or anchor
    return m


mpmath.mp.dps = 40


def cos_sin(positions, inv_freq, attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 [T, R/2] cos and sin of position x inv_freq (fp32 inv_freq taken exactly), times scaling."""
    pos = [mpmath.mpf(float(p)) for p in positions.tolist()]
    f = [mpmath.mpf(float(x)) for x in inv_freq.to(torch.float32).tolist()]
    c = torch.tensor([[float(mpmath.cos(p * x)) for x in f] for p in pos], dtype=torch.float64)
    s = torch.tensor([[float(mpmath.sin(p * x)) for x in f] for p in pos], dtype=torch.float64)
    return c * attention_scaling, s * attention_scaling


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    """x: [T, H, D] fp64 -> rotated (pairs (p, p + R/2) or (2p, 2p + 1)); dims >= R untouched."""
    half = rotary_dim // 2
    if interleaved:
        i1 = torch.arange(half) * 2
        i2 = i1 + 1
    else:
        i1 = torch.arange(half)
        i2 = i1 + half
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., i1], x[..., i2]
    out = x.clone()
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x2 * c + x1 * s
    return out


def attention(q, k, v, mask: torch.Tensor, softmax_scale: float | None = None):
    """fp64 (out [T, Hq, D], lse [Hq, T]); rows with no allowed key give out 0, lse -inf."""
    T, HQ, D = q.shape
    g = HQ // k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, kk) * scale
    s = s.masked_fill(~mask[None], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~mask[None], 0.0)
    return torch.einsum("hij,jhd->ihd", p, vv), lse


# a bound on |kernel score - exact score| / sigma_ij for the split product of "bf16x3": hi = bf16(r)
# and lo = bf16(r - hi) leave |r - hi - lo| <= 2^-16 |r| (round to nearest), and the dropped lo.lo
# is <= 2^-16 (1 + 2^-8)^2 |q_d k_d|: three such terms, plus a margin for the fp32 rotation
QK_EPS = {"bf16": 0.0, "bf16x3": 4 * 2.0 ** -16, "fp32": 0.0}


def run(q, k, v, cu, rows, na, causal, window, scale=None, rope=None, dout=None, dlse=None, with_bounds=False,
        bf16_truncates=False, qk_precision="bf16", split_grad_operand=False):
    """fp64 out, lse, gradients w.r.t. q, k, v (with dout; else None) and, with ``with_bounds``,
    the elementwise error bounds of a kernel (see :func:`bounds`; else None).

    rope: None or (positions, inv_freq, rotary_dim, interleaved, attention_scaling). With rope
    and 16-bit inputs the rotated q and k are rounded to the input dtype, as apply_rope's
    output is (and as the kernels do before their products); ``bf16_truncates``: the kernel
    under test casts to bf16 by truncation (the Triton interpreter).

    qk_precision "bf16x3" / "fp32": the rotated q and k are not rounded (the exact products
    those modes approximate); the bounds then add QK_EPS[mode] * sigma to each score's error,
    and with ``split_grad_operand`` (the Triton kernel: its dS.k and dS^T.q products take
    (hi + lo) rounded to the input dtype) one rounding of that operand to the dq, dk bounds."""
    dtype = q.dtype
    T, _, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    leaves = [x.detach().cpu().to(torch.float64).requires_grad_(True) for x in (q, k, v)]
    mask = allowed_mask(T, cu.tolist(), None if rows is None else rows.tolist(), na, causal, window)
    qq, kk = leaves[0], leaves[1]
    if rope is not None:
        pos, inv_freq, rd, inter, scaling = rope
        c, s = cos_sin(pos.cpu(), inv_freq.cpu(), scaling)
        qq, kk = rotate(qq, c, s, rd, inter), rotate(kk, c, s, rd, inter)
        if dtype in (torch.float16, torch.bfloat16) and qk_precision == "bf16":
            qq, kk = round_like(qq, dtype, bf16_truncates), round_like(kk, dtype, bf16_truncates)
    out, lse = attention(qq, kk, leaves[2], mask, scale)
    grads = None
    if dout is not None:
        outs, gs = [out], [dout.detach().cpu().to(torch.float64)]
        if dlse is not None:
            outs.append(lse)
            gs.append(dlse.detach().cpu().to(torch.float64))
        grads = torch.autograd.grad(outs, leaves, gs)
    bnd = None
    if with_bounds:
        dd = dout if dout is not None else torch.zeros_like(out)
        b_out, b_lse, b_dq, b_dk, b_dv = bounds(qq.detach(), kk.detach(), leaves[2].detach(), mask, scale,
                                                out.detach(), dd.detach().cpu(),
                                                None if dlse is None else dlse.detach().cpu(), dtype,
                                                qk_eps=QK_EPS[qk_precision] if rope is not None else 0.0,
                                                grad_operand=rope is not None and split_grad_operand
                                                and dtype in (torch.float16, torch.bfloat16))
        if rope is not None:      # the gradients are rotated back by -theta: |R^T| mixes each pair
            b_dq, b_dk = (rotate_bound(b, c, s, rd, inter) for b in (b_dq, b_dk))
        bnd = (b_out, b_lse, b_dq, b_dk, b_dv)
    return out.detach(), lse.detach(), grads, bnd


def rotate_bound(b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    """A bound on |R^T e| from a bound ``b`` on |e| (pairs mixed with |cos|, |sin|)."""
    half = rotary_dim // 2
    i1 = torch.arange(half) * 2 if interleaved else torch.arange(half)
    i2 = i1 + 1 if interleaved else i1 + half
    c, s = cos.abs()[:, None, :], sin.abs()[:, None, :]
    out = b.clone()
    out[..., i1] = b[..., i1] * c + b[..., i2] * s
    out[..., i2] = b[..., i2] * c + b[..., i1] * s
    return out


# ---------------------------------------------------------------------------
# error bounds of a kernel against this oracle, derived from the inputs of each case


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
            torch.bfloat16: 2.0 ** -8}[dtype]


def round_like(x: torch.Tensor, dtype: torch.dtype, truncate: bool = False) -> torch.Tensor:
    """x rounded to ``dtype`` and back, with a straight-through gradient (what a kernel that
    rounds rotated q/k before its products differentiates). ``truncate``: fp32 -> bf16 by
    truncation, as the Triton interpreter casts (fp16 it rounds to nearest)."""
    xd = x.detach()
    if truncate and dtype == torch.bfloat16:
        bits = xd.to(torch.float32).view(torch.int32) & -65536        # keep the top 16 bits
        r = bits.view(torch.float32).to(torch.float64)
    else:
        r = xd.to(dtype).to(torch.float64)
    return x + (r - xd)


def bounds(qr, kr, v, mask, scale, out, dout, dlse, dtype, delta_from_rounded_out: bool = True,
           qk_eps: float = 0.0, grad_operand: bool = False):
    """Elementwise bounds on |kernel - oracle| for (out, lse, dq_rot, dk_rot, dv) of a kernel that
    computes in fp32 from the ``dtype`` inputs, rounds P and dS to ``dtype`` before its products
    and rounds each output once (qr, kr: the rotated, already rounded q/k, fp64):

        out: 4 u (A + |out|) + 2 D u32 B        A = sum_j p |v_j|, B = sum_j p (1 + sigma)(|v_j| + |out|)
        dv:  4 u (sum_i p |do_i| + |dv|) + 2 D u32 sum_i p (1 + sigma) |do_i|
        dq:  4 u (scale sum_j Ds |k_j| + |dq|) + 2 D u32 scale sum_j p (1 + sigma) E |k_j|   (dk alike)
        lse: 2 D u32 (|lse| + sum_j p (1 + sigma))
    with u the unit roundoff of ``dtype`` (each rounding counted as 2u: the Triton interpreter
    truncates), u32 = 2^-24 for the fp32 products and exponentials (D terms per dot),
    sigma_ij = scale sum_d |q_id k_jd| (a score's magnitude), Ds_ij = |ds_ij| + p_ij sum_d |do out|
    (dS and delta = rowsum(out * dout), from the rounded out), E_ij = |do_i||v_j| + |delta_i|.
    ``qk_eps``: each score's own error is (2 D u32 (1 + sigma) + qk_eps sigma) instead of the
    first term alone (the split "bf16x3" product); ``grad_operand``: the dq / dk products' k / q
    operand is rounded to ``dtype`` too (2 u more in their first term).
    Returns fp64 tensors shaped like out [T, Hq, D], lse [Hq, T], dq, dk [T, Hk, D], dv.
    """
    T, HQ, D = qr.shape
    HK = kr.shape[1]
    g = HQ // HK
    u, u32, n32 = unit_roundoff(dtype), 2.0 ** -24, 2.0 * D
    with torch.no_grad():
        kk, vv = kr.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("ihd,jhd->hij", qr, kk) * scale
        sigma = torch.einsum("ihd,jhd->hij", qr.abs(), kk.abs()) * scale
        s = s.masked_fill(~mask[None], -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~mask[None], 0.0)
        ps = p * (1 + sigma + (qk_eps / (n32 * u32)) * sigma)   # n32 u32 ps: the score error's weight
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
        dsa = ds.abs() + (p * (doa * oa).sum(-1).transpose(0, 1)[..., None] if delta_from_rounded_out else 0)
        E = torch.einsum("ihd,jhd->hij", doa, va) + delta.abs()
        pe = ps * E
        dv = torch.einsum("hij,ihd->jhd", p, do).reshape(T, HK, g, D).sum(2)
        dq = torch.einsum("hij,jhd->ihd", ds, kk) * scale
        dk = (torch.einsum("hij,ihd->jhd", ds, qr) * scale).reshape(T, HK, g, D).sum(2)
        grp = lambda x: x.reshape(T, HK, g, D).sum(2)  # noqa: E731
        b_dv = 4 * u * (grp(torch.einsum("hij,ihd->jhd", p, doa)) + dv.abs()) \
            + n32 * u32 * grp(torch.einsum("hij,ihd->jhd", ps, doa))
        ug = (6 if grad_operand else 4) * u
        b_dq = ug * (torch.einsum("hij,jhd->ihd", dsa, kk.abs()) * scale + dq.abs()) \
            + n32 * u32 * torch.einsum("hij,jhd->ihd", pe, kk.abs()) * scale
        b_dk = ug * (grp(torch.einsum("hij,ihd->jhd", dsa, qr.abs())) * scale + dk.abs()) \
            + n32 * u32 * grp(torch.einsum("hij,ihd->jhd", pe, qr.abs())) * scale
    return b_out, b_lse, b_dq, b_dk, b_dv

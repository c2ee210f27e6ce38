"""Dense masked attention in fp64: the oracle of the attention ops.

    mask[i, j] = (doc(i) == doc(j) and (not causal or j <= i) and in_window(i, j))
                 or (row(i) == row(j) and j < row_start(i) + num_anchors and (not causal or j <= i))
    in_window(i, j) = i - j < window (causal) ; |i - j| < window (non-causal) ; True when window is None
    out[i]  = softmax_j(scale * q[i] . k[j], over mask[i, :]) @ v
    lse[i]  = log sum_j exp(scale * q[i] . k[j])  over mask[i, :]

With a relative-position map (posattn.position_maps), pair (i, j) is scored with q and k rotated
near (at p_i, p_j) or far (at far_q(i), far_k(j)) as the map says:

    s_ij = scale * (far_ij ? qf[i] . kf[j] : qn[i] . kn[j])

and the gradients of the two rotations are rotated back separately (dq = R(p_i)^T dq_near +
R(far_q(i))^T dq_far, likewise dk).

The mask is evaluated at every (i, j): this file is for small T only.
"""
from __future__ import annotations

import torch

from posattn.kernels.reference import rope as ref_rope


def token_ids(boundaries: torch.Tensor, T: int) -> torch.Tensor:
    """int64 [T]: index of the segment (of ``boundaries`` [N+1]) holding each token."""
    b = boundaries.to("cpu", torch.int64).tolist()
    ids = torch.empty(T, dtype=torch.int64)
    for s in range(len(b) - 1):
        ids[b[s]:b[s + 1]] = s
    return ids


def build_mask(T: int, cu_seqlens: torch.Tensor, cu_rows: torch.Tensor | None = None, num_anchors: int = 1,
               causal: bool = True, window: int | None = None) -> torch.Tensor:
    """The explicit boolean mask [T, T] (True = query i may attend to key j), on the CPU."""
    doc = token_ids(cu_seqlens, T)
    if cu_rows is None:
        cu_rows = torch.tensor([0, T])
    row = token_ids(cu_rows, T)
    row_start = torch.tensor(cu_rows.to("cpu", torch.int64).tolist())[row]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    order = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    same_doc = doc[:, None] == doc[None, :]
    if window is None:
        win = torch.ones(T, T, dtype=torch.bool)
    else:
        win = (i - j < window) if causal else ((i - j).abs() < window)
    anchor = (row[:, None] == row[None, :]) & (j < row_start[:, None] + num_anchors)
    return (same_doc & order & win) | (anchor & order)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     softmax_scale: float | None = None, far=None):
    """q: [T, Hq, D], k, v: [T, Hk, D] (Hq % Hk == 0), mask: bool [T, T]; ``far``: None or
    (qf [T, Hq, D], kf [T, Hk, D], far bool [T, T]): the pairs where far is True are scored
    with qf . kf instead of q . k (a position map's far rotation).

    Returns fp64 (out [T, Hq, D], lse [Hq, T]), differentiable in q, k, v.
    Rows with no allowed key get out = 0 and lse = -inf.
    """
    T, HQ, D = q.shape
    HK = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    g = HQ // HK
    k64 = k64.repeat_interleave(g, dim=1)
    v64 = v64.repeat_interleave(g, dim=1)
    s = torch.einsum("ihd,jhd->hij", q64, k64) * scale
    if far is not None:
        qf, kf, fm = far
        sf = torch.einsum("ihd,jhd->hij", qf.to(torch.float64), kf.to(torch.float64).repeat_interleave(g, 1)) * scale
        s = torch.where(fm.to(s.device)[None], sf, s)
    m = mask.to(s.device)[None]
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # [H, T]
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0))
    p = p.masked_fill(~m, 0.0)
    out = torch.einsum("hij,jhd->ihd", p, v64)
    return out, lse


def rotate_thd(x: torch.Tensor, positions: torch.Tensor, inv_freq, rotary_dim: int,
               interleaved: bool, attention_scaling: float = 1.0, is_query: bool = True,
               sign: float = 1.0) -> torch.Tensor:
    """x: [T, H, D]; positions: [T] ([n_axes, T] with mrope sections) int or float -> fp64
    [T, H, D] rotated by sign * theta (as apply_rope does). ``inv_freq``: fp32 [R/2], or a
    posattn.lowered.RopeTables (per-head rows, mrope sections, DPE; ``is_query`` selects DPE's
    query offset)."""
    from posattn.lowered import RopeTables

    tables = inv_freq if isinstance(inv_freq, RopeTables) else RopeTables(inv_freq)
    pos3 = (positions if positions.dim() == 2 else positions[None])[:, None, :]   # [A, 1, T]
    ang = ref_rope.rope_angles(pos3, tables, is_query)                            # [1, T, rows, R/2]
    return ref_rope.rotate(x.unsqueeze(0), ang, rotary_dim, interleaved, attention_scaling, sign).squeeze(0)


def _rotated(x, rope_args, qk_precision="bf16", is_query=True):
    """x rotated in fp64 and, for 16-bit inputs with qk_precision "bf16", rounded to their
    dtype: what apply_rope returns, and what attention then multiplies (fp32 and fp64 inputs,
    and "bf16x3" / "fp32", stay fp64: the exact products those modes approximate)."""
    positions, inv_freq, rotary_dim, interleaved, scaling = rope_args
    r = rotate_thd(x, positions, inv_freq, rotary_dim, interleaved, scaling, is_query)
    if x.dtype in (torch.float16, torch.bfloat16) and qk_precision == "bf16":
        r = r.to(x.dtype).to(torch.float64)
    return r


def _far_rope(rope_args, position_map):
    """(far q rope_args, far k rope_args, far [T, T] bool) of a position map: the rotations at the
    map's far positions (rounded as the kernels' tables take them) and the pairs that use them."""
    from posattn.position_maps import VistaRoPE, far_pairs

    positions = rope_args[0]
    vis = position_map.visual if isinstance(position_map, VistaRoPE) else None
    fm = far_pairs(position_map, positions, positions, vis, vis).cpu()
    return ((position_map.far_q(positions),) + tuple(rope_args[1:]),
            (position_map.far_k(positions),) + tuple(rope_args[1:]), fm)


def anchor_attention(q, k, v, cu_seqlens, cu_rows=None, num_anchors=1, causal=True, window=None,
                     softmax_scale=None, rope_args=None, qk_precision="bf16", position_map=None):
    """fp64 anchor attention. ``rope_args``: None or (positions, inv_freq, rotary_dim, interleaved,
    attention_scaling); q and k are rotated in fp64 first (and rounded to a 16-bit input dtype,
    as apply_rope's output is). ``position_map``: None or a posattn.position_maps map (with
    rope_args): far pairs use q, k rotated at the map's far positions. Returns fp64 (out, lse)."""
    T = q.shape[0]
    mask = build_mask(T, cu_seqlens, cu_rows, num_anchors, causal, window)
    far = None
    if rope_args is not None:
        if position_map is not None:
            fq, fk, fm = _far_rope(rope_args, position_map)
            far = (_rotated(q, fq, qk_precision), _rotated(k, fk, qk_precision, False), fm)
        q, k = _rotated(q, rope_args, qk_precision), _rotated(k, rope_args, qk_precision, False)
    return masked_attention(q, k, v, mask, softmax_scale, far)


def anchor_attention_backward(dout, dlse, q, k, v, cu_seqlens, cu_rows=None, num_anchors=1, causal=True,
                              window=None, softmax_scale=None, rope_args=None, qk_precision="bf16",
                              position_map=None):
    """fp64 gradients (dq, dk, dv) of :func:`anchor_attention`, written out (no autograd):

        p = softmax(s) over the mask; dv = p^T dout; dp = dout v^T
        ds = p * (dp - rowsum(dout * out) + dlse); dq_r = scale ds k_r; dk_r = scale ds^T q_r
        with rope, dq = R(theta)^T dq_r (rotation by -theta, times attention_scaling), likewise dk.
    """
    T, HQ, D = q.shape
    HK = k.shape[1]
    g = HQ // HK
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    mask = build_mask(T, cu_seqlens, cu_rows, num_anchors, causal, window)
    far = None
    if rope_args is not None:
        positions, inv_freq, rotary_dim, interleaved, scaling = rope_args
        if position_map is not None:
            fq_args, fk_args, fm = _far_rope(rope_args, position_map)
            qf = _rotated(q, fq_args, qk_precision)
            kf = _rotated(k, fk_args, qk_precision, False).repeat_interleave(g, dim=1)
            far = fm.to(q.device)[None]
        q, k = _rotated(q, rope_args, qk_precision), _rotated(k, rope_args, qk_precision, False)   # gradients pass the rounding straight
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    kr, vr = k64.repeat_interleave(g, dim=1), v64.repeat_interleave(g, dim=1)
    m = mask.to(q64.device)[None]
    s = torch.einsum("ihd,jhd->hij", q64, kr) * scale
    if far is not None:
        s = torch.where(far, torch.einsum("ihd,jhd->hij", qf, kf) * scale, s)
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).masked_fill(~m, 0.0)
    do = dout.to(torch.float64)
    out = torch.einsum("hij,jhd->ihd", p, vr)
    dv = torch.einsum("hij,ihd->jhd", p, do)
    dp = torch.einsum("ihd,jhd->hij", do, vr)
    delta = (do * out).sum(-1).transpose(0, 1)[..., None]          # [H, T, 1]
    if dlse is not None:
        delta = delta - dlse.to(torch.float64)[..., None]
    ds = p * (dp - delta)
    ds_far = None
    if far is not None:
        ds, ds_far = ds.masked_fill(far, 0.0), ds.masked_fill(~far, 0.0)
    dq = torch.einsum("hij,jhd->ihd", ds, kr) * scale
    dk = torch.einsum("hij,ihd->jhd", ds, q64) * scale
    dk = dk.reshape(T, HK, g, D).sum(2)
    dv = dv.reshape(T, HK, g, D).sum(2)
    if rope_args is not None:
        dq = rotate_thd(dq, positions, inv_freq, rotary_dim, interleaved, scaling, True, -1.0)
        dk = rotate_thd(dk, positions, inv_freq, rotary_dim, interleaved, scaling, False, -1.0)
    if ds_far is not None:      # the far pairs' gradients, rotated back by their own rotation
        dqf = torch.einsum("hij,jhd->ihd", ds_far, kf) * scale
        dkf = (torch.einsum("hij,ihd->jhd", ds_far, qf) * scale).reshape(T, HK, g, D).sum(2)
        dq = dq + rotate_thd(dqf, fq_args[0], inv_freq, rotary_dim, interleaved, scaling, True, -1.0)
        dk = dk + rotate_thd(dkf, fk_args[0], inv_freq, rotary_dim, interleaved, scaling, False, -1.0)
    return dq, dk, dv

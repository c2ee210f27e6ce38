"""Triton rotary kernel: positions x RopeTables, or explicit angles; any sign.

Grid: (B*S tokens, head blocks of q then of k). Each program handles BLOCK_H
heads of one token. For pair p of head h (row(h) = h // (H // ROWS)):

    pos   = positions[pair_axis[p] or 0, b, s]                     (int or float)
    DPE:    pos = floor(pos / pair_pos_scale[p]) (+ pair_q_offset[p] for q programs)
    theta = pos * inv_freq[row(h), p], reduced modulo 2*pi exactly in fp64
            (pos split at 4096 so both partial products are exact; 2*pi in two parts)
    or      theta = angles[b, s, row(h), p]                          (FROM_ANGLES)
    out1 = a (x1 cos - x2 sin) ; out2 = a (x2 cos + x1 sin)    a = attention_scaling,
    sin negated for SIGN = -1 (the backward / inverse rotation);
    half-split pairs (p, p + R/2), interleaved pairs (2p, 2p + 1)

Inputs are loaded in their dtype, converted to fp32 at once and rounded once
at the store; cos/sin are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton.rope_common import (TL_DTYPE, config_ok, default_config, plan, qk_signature,
                                                rotate_heads, search_space, tile_meta)

TWO_PI = tl.constexpr(6.283185307179586)
INV_TWO_PI = tl.constexpr(0.15915494309189535)
TWO_PI_C1 = tl.constexpr(6.2831854820251465)      # 24 significant bits
TWO_PI_C2 = tl.constexpr(-1.748455600074497e-07)  # 2*pi - C1


@triton.jit
def _reduce_exact(x):
    """x - 2*pi*round(x / 2*pi) for an exact fp64 x (k * C1 is exact for |x| < 2^31)."""
    k = tl.floor(x * INV_TWO_PI + 0.5)
    return (x - k * TWO_PI_C1) - k * TWO_PI_C2


@triton.jit
def _reduced_angle(pos, inv_freq):
    """pos * inv_freq (fp64 in, fp64 out) reduced to [-pi, pi] without a rounded product."""
    hi = tl.floor(pos * (1.0 / 4096.0)) * 4096.0
    lo = pos - hi
    r = _reduce_exact(hi * inv_freq) + _reduce_exact(lo * inv_freq)
    return r - tl.floor(r * INV_TWO_PI + 0.5) * TWO_PI


@triton.jit
def position_angle(tok_pos_ptr, pos_sa, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr, row, p, pmask, m,
                   is_q, HALF: tl.constexpr, PER_ROW: tl.constexpr, MULTI_AXIS: tl.constexpr, DPE: tl.constexpr,
                   Q_OFFSET: tl.constexpr):
    """fp32 theta of one token's pairs p, read as posattn/lowered.py says: [BLOCK_H, BLOCK_P]
    (PER_ROW, rows ``row``) or [BLOCK_P]. ``tok_pos_ptr`` points at the token's axis-0 position;
    axes are ``pos_sa`` apart. The rope and rope_and_cache kernels share it."""
    if MULTI_AXIS:
        axis = tl.load(pair_axis_ptr + p, mask=pmask, other=0).to(tl.int64)
        pos = tl.load(tok_pos_ptr + axis * pos_sa, mask=pmask, other=0)
    else:
        pos = tl.load(tok_pos_ptr)
    pos = pos.to(tl.float64)
    if DPE:
        pscale = tl.load(pos_scale_ptr + p, mask=pmask, other=1.0).to(tl.float64)
        pos = tl.floor(pos / pscale)
        if Q_OFFSET:
            if is_q:
                pos = pos + tl.load(q_offset_ptr + p, mask=pmask, other=0.0).to(tl.float64)
    if PER_ROW:
        f = tl.load(inv_freq_ptr + row[:, None] * HALF + p[None, :], mask=m, other=0.0)
        if MULTI_AXIS or DPE:
            pos = pos[None, :]
    else:
        f = tl.load(inv_freq_ptr + p, mask=pmask, other=0.0)
    return _reduced_angle(pos, f.to(tl.float64)).to(tl.float32)


@triton.jit
def _rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr,
    pos_ptr, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr, ang_ptr,
    S, HQ, HK, NQB, HPR_Q, HPR_K,
    q_sb, q_ss, q_sh, qo_sb, qo_ss, qo_sh,
    k_sb, k_ss, k_sh, ko_sb, ko_ss, ko_sh,
    pos_sa, pos_sb, pos_ss, ang_sb, ang_ss, ang_sh,
    attention_scaling, sign,
    HALF: tl.constexpr, D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
    FROM_ANGLES: tl.constexpr, PER_ROW: tl.constexpr, MULTI_AXIS: tl.constexpr,
    DPE: tl.constexpr, Q_OFFSET: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // S
    s = tok - b * S
    is_q = hb < NQB

    if is_q:
        x_ptr = q_ptr
        o_ptr = qo_ptr
        h0 = hb * BLOCK_H
        H = HQ
        hpr = HPR_Q
        sb, ss, sh = q_sb, q_ss, q_sh
        osb, oss, osh = qo_sb, qo_ss, qo_sh
    else:
        x_ptr = k_ptr
        o_ptr = ko_ptr
        h0 = (hb - NQB) * BLOCK_H
        H = HK
        hpr = HPR_K
        sb, ss, sh = k_sb, k_ss, k_sh
        osb, oss, osh = ko_sb, ko_ss, ko_sh

    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    hmask = h < H
    m = hmask[:, None] & pmask[None, :]
    row = h // hpr

    if FROM_ANGLES:
        a_ptr = ang_ptr + b * ang_sb + s * ang_ss
        if PER_ROW:
            ang = tl.load(a_ptr + row[:, None] * ang_sh + p[None, :], mask=m, other=0.0)
        else:
            ang = tl.load(a_ptr + p, mask=pmask, other=0.0)
        theta = _reduce_exact(ang.to(tl.float64)).to(tl.float32)
        scale = 1.0
    else:
        theta = position_angle(pos_ptr + b * pos_sb + s * pos_ss, pos_sa, inv_freq_ptr, pair_axis_ptr,
                               pos_scale_ptr, q_offset_ptr, row, p, pmask, m, is_q,
                               HALF, PER_ROW, MULTI_AXIS, DPE, Q_OFFSET)
        scale = attention_scaling
    cos = tl.cos(theta) * scale
    sin = tl.sin(theta) * (scale * sign)
    if not PER_ROW:
        cos = cos[None, :]
        sin = sin[None, :]

    rotate_heads(x_ptr + b * sb + s * ss + h[:, None] * sh, o_ptr + b * osb + s * oss + h[:, None] * osh,
                 p, pmask, hmask, cos, sin, cos, sin, HALF, D, BLOCK_T, INTERLEAVED, COPY_TAIL)


def _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, *, pos3=None, tables=None,
            angles=None):
    L = plan(q, qo, k, ko, rotary_dim, interleaved, config)
    if L is None:
        return
    if angles is not None:
        rows = angles.shape[2]
        dummy = angles
        ptrs = (dummy, dummy, dummy, dummy, dummy, angles)
        pstr = (0, 0, 0)
        astr = (0 if angles.shape[0] == 1 else angles.stride(0), angles.stride(1),
                0 if rows == 1 else angles.stride(2))
        flags = dict(FROM_ANGLES=True, MULTI_AXIS=False, DPE=False, Q_OFFSET=False)
        scale = 1.0
    else:
        inv = tables.inv_freq
        rows = 1 if inv.dim() == 1 else inv.shape[0]
        ptrs = (pos3, inv, tables.pair_axis if tables.pair_axis is not None else inv,
                tables.pair_pos_scale if tables.pair_pos_scale is not None else inv,
                tables.pair_q_offset if tables.pair_q_offset is not None else inv, inv)
        pstr = (pos3.stride(0), 0 if pos3.shape[1] == 1 else pos3.stride(1), pos3.stride(2))
        astr = (0, 0, 0)
        flags = dict(FROM_ANGLES=False, MULTI_AXIS=tables.pair_axis is not None,
                     DPE=tables.pair_pos_scale is not None,
                     Q_OFFSET=tables.pair_pos_scale is not None and tables.pair_q_offset is not None)
        scale = float(tables.attention_scaling)
    _rope_kernel[L.grid](
        *L.tensors, *ptrs,
        L.S, L.HQ, L.HK, L.NQB, max(L.HQ // rows, 1), max(L.HK // rows, 1),
        *L.strides, *pstr, *astr, scale, float(sign),
        PER_ROW=rows > 1, num_warps=L.num_warps, **L.meta, **flags,
    )


def rope_forward(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    """Same contract as posattn.kernels.cpu.rope_forward."""
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos3=pos3, tables=tables)


def rope_angles_forward(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float,
                        config: dict):
    """Same contract as posattn.kernels.cpu.rope_angles_forward."""
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, angles=angles)


# ---------------------------------------------------------------------------
# ahead-of-time compilation (tests compile every specialisation for sm_90a/sm_80)

_INT_ARGS = ("S", "HQ", "HK", "NQB", "HPR_Q", "HPR_K")
_STRIDE_ARGS = ("pos_sa", "pos_sb", "pos_ss", "ang_sb", "ang_ss", "ang_sh")
# the variants the public ops launch: (name, FROM_ANGLES, PER_ROW, MULTI_AXIS, DPE, Q_OFFSET)
VARIANTS = (
    ("plain", False, False, False, False, False),
    ("mrope", False, False, True, False, False),
    ("perhead", False, True, False, False, False),
    ("dpe", False, False, True, True, True),
    ("angles", True, False, False, False, False),
    ("angles_perhead", True, True, False, False, False),
)


def _spec(d, rot, dtype, inter, variant, pos_t):
    vname, from_ang, per_row, multi, dpe, qoff = variant
    ty = TL_DTYPE[dtype]
    cfg = default_config(d, rot, 32)
    meta = dict(tile_meta(d, rot, inter, rot < d, cfg["BLOCK_H"]), FROM_ANGLES=from_ang,
                PER_ROW=per_row, MULTI_AXIS=multi, DPE=dpe, Q_OFFSET=qoff)
    sig = {n: "constexpr" for n in meta}
    sig.update(qk_signature(ty))
    sig.update({"pos_ptr": f"*{'fp32' if from_ang else pos_t}", "inv_freq_ptr": "*fp32",
                "pair_axis_ptr": "*i32", "pos_scale_ptr": "*fp32",
                "q_offset_ptr": "*fp32", "ang_ptr": "*fp32",
                "attention_scaling": "fp32", "sign": "fp32"})
    sig.update({n: "i32" for n in _INT_ARGS})
    sig.update({n: "i64" for n in _STRIDE_ARGS})
    name = (f"rope_{vname}_d{d}_r{rot}_{ty}_{'inter' if inter else 'half'}"
            f"{'' if from_ang else '_pos' + pos_t}")
    return name, _rope_kernel, sig, meta, cfg["num_warps"]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POS_TYPES = ("i32", "i64", "fp32", "fp64")


def aot_specializations(full: bool = False, arch: int = 90):
    """Yield (name, kernel, signature, constexprs, num_warps) for ahead-of-time compiles.

    ``full=True``: the whole product of head dims (64, 80, 96, 128, 256, each also with
    half-width rotary), dtypes, pairings, variants and position dtypes (~1100 kernels).
    Default: a covering set that compiles every variant in every dtype, every position
    dtype, both pairings, partial rotary and every head dim at least once (sm_90a), or
    its core (plain / mrope / angles in every dtype, head_dim 128 and 80) for sm_80.
    """
    if full:
        for d in (64, 80, 96, 128, 256):
            for rot in sorted({d, d // 2 if (d // 2) % 2 == 0 else d}):
                for dtype in _DTYPES:
                    for inter in (False, True):
                        for v in VARIANTS:
                            for pos_t in (("fp32",) if v[1] else _POS_TYPES):
                                yield _spec(d, rot, dtype, inter, v, pos_t)
        return
    seen = set()

    def once(*a):
        key = a[:5] + (a[5] if not a[4][1] else "fp32",)
        if key not in seen:
            seen.add(key)
            return [_spec(*a)]
        return []

    bf16 = torch.bfloat16
    plain, mrope = VARIANTS[0], VARIANTS[1]
    angles = VARIANTS[4]
    if arch < 90:
        for dtype in _DTYPES:
            for v in (plain, mrope, angles):
                yield from once(128, 128, dtype, False, v, "i64")
        yield from once(80, 80, bf16, False, plain, "i64")
        return
    for v in VARIANTS:
        for dtype in _DTYPES:
            yield from once(128, 128, dtype, False, v, "i64")
        yield from once(128, 128, bf16, True, v, "i64")
    for pos_t in _POS_TYPES:
        yield from once(128, 128, bf16, False, plain, pos_t)
        yield from once(128, 128, bf16, False, mrope, pos_t)
    for d, rot in ((64, 64), (80, 80), (96, 48), (256, 256), (256, 128)):
        yield from once(d, rot, bf16, False, plain, "i64")
    yield from once(80, 40, torch.float16, True, VARIANTS[3], "fp32")


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

rope_search_space = search_space
rope_config_ok = config_ok

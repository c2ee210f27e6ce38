"""The decode kernel's in-kernel rotation (pre-RoPE caches, qk_precision, position maps): the
tile routines ``_decode_fwd`` (posattn/kernels/triton/decode.py) calls when QROT is set, and the
launch arguments of a DecodeRotary (posattn/decode/rotary.py).

q arrives rotated in fp32 (QN; QF at a map's far positions); a key tile is loaded as its two
rotary halves and the tail (flash_attn_tiles' layout), the halves rotated in fp32 by the call's
table row of each slot (KT [2, rows, S, R/2]: cos, sin), and both operands are made by the
attention engine's ``_qk_operand`` and multiplied by its ``_scores``: the same split and the
same products as anchor attention's ``qk_precision``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton.flash_attn_tiles import (_bf16_rne, _map_side, _pair_cols, _pair_far, _qk_operand,
                                                     _scores, _tile_kinds, tile_meta)


@triton.jit
def _operand(r, DT: tl.constexpr, QKP: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr):
    """_qk_operand; RNE (the interpreter with bf16 and "bf16", whose casts truncate): round to
    nearest even first, so the operand is the bf16 value a GPU (and apply_rope) would store."""
    if RNE:
        r = _bf16_rne(r)
    return _qk_operand(r, DT, QKP, UPCAST)


@triton.jit
def _q_halves(QX, t, h, rvalid, s_xt, s_xh, ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr,
              BT: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr, DT: tl.constexpr, QKP: tl.constexpr,
              UPCAST: tl.constexpr, RNE: tl.constexpr):
    """(a, a_lo, b, b_lo, tail) product operands of the program's rows of an fp32 rotated q [T, Hq, D]."""
    ca, cb, pm = _pair_cols(BH, R_HALF, INTERLEAVED)
    row = QX + t[:, None] * s_xt + h[:, None].to(tl.int64) * s_xh
    m2 = rvalid[:, None] & pm[None, :]
    a, a_lo = _operand(tl.load(row + ca[None, :], mask=m2, other=0.0).to(tl.float32), DT, QKP, UPCAST, RNE)
    b, b_lo = _operand(tl.load(row + cb[None, :], mask=m2, other=0.0).to(tl.float32), DT, QKP, UPCAST, RNE)
    c = ROT + tl.arange(0, BT)
    tail = tl.load(row + c[None, :], mask=rvalid[:, None] & (c < D)[None, :], other=0.0).to(DT)
    return a, a_lo, b, b_lo, tail


@triton.jit
def _k_operands(xa, xb, TAB, trow, kvalid, s_tc, BH: tl.constexpr, R_HALF: tl.constexpr, KROT: tl.constexpr,
                DT: tl.constexpr, QKP: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr):
    """(a, a_lo, b, b_lo) of a key tile's fp32 halves xa/xb [BN, BH]: rotated by the table rows
    ``trow`` (cos at TAB + trow, sin at + s_tc) when KROT (a pre-RoPE cache), as stored otherwise."""
    if KROT:
        p = tl.arange(0, BH)
        m2 = kvalid[:, None] & (p < R_HALF)[None, :]
        c = tl.load(TAB + trow[:, None] + p[None, :], mask=m2, other=1.0)
        sn = tl.load(TAB + s_tc + trow[:, None] + p[None, :], mask=m2, other=0.0)
        ra = xa * c - xb * sn
        rb = xb * c + xa * sn
    else:
        ra = xa
        rb = xb
    a, a_lo = _operand(ra, DT, QKP, UPCAST, RNE)
    b, b_lo = _operand(rb, DT, QKP, UPCAST, RNE)
    return a, a_lo, b, b_lo


@triton.jit
def _rot_tile(kp, j, kvalid, b, KT, KTF, KP, VIS, MWIN, s_tc, s_tb, s_tt, s_kpb, s_vis, s_fc, s_fb, s_ft,
              qa, qa_lo, qb, qb_lo, qt, fa, fa_lo, fb, fb_lo, ft, qpos, vq, rvalid,
              BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, KROT: tl.constexpr, MAP: tl.constexpr,
              ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
              INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr, DT: tl.constexpr, QKP: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr):
    """Scores [BM, BN] (unscaled) of one key tile at slots j (kp: each key's row pointer) against
    the program's rotated q operands; with a map, near and/or far products as the tile needs
    (the attention engine's _map_side / _pair_far / _tile_kinds: fp64 positions, visual flags;
    qpos/vq: the rows' query side)."""
    ca, cb, pm = _pair_cols(BH, R_HALF, INTERLEAVED)
    m2 = kvalid[:, None] & pm[None, :]
    xa = tl.load(kp[:, None] + ca[None, :], mask=m2, other=0.0).to(tl.float32)
    xb = tl.load(kp[:, None] + cb[None, :], mask=m2, other=0.0).to(tl.float32)
    c = ROT + tl.arange(0, BT)
    kt = tl.load(kp[:, None] + c[None, :], mask=kvalid[:, None] & (c < D)[None, :], other=0.0)
    brow = b.to(tl.int64) * s_tb
    trow = brow + j.to(tl.int64) * s_tt
    if MAP == 0:
        ka, ka_lo, kb, kb_lo = _k_operands(xa, xb, KT, trow, kvalid, s_tc, BH, R_HALF, KROT, DT, QKP,
                                               UPCAST, RNE)
        s = _scores(qa, qb, qt, ka, kb, kt, BM, BN, True, HAS_TAIL, PREC, UPCAST, qa_lo, qb_lo, ka_lo, kb_lo, QKP)
    else:
        kpos, vk = _map_side(KP + b.to(tl.int64) * s_kpb, VIS + b.to(tl.int64) * s_vis, j, kvalid, MAP)
        far = _pair_far(qpos[:, None], kpos[None, :], vq[:, None], vk[None, :], MWIN, MAP)
        need_near, need_far = _tile_kinds(far, rvalid[:, None] & kvalid[None, :])
        s = tl.zeros([BM, BN], tl.float32)
        if need_near:
            ka, ka_lo, kb, kb_lo = _k_operands(xa, xb, KT, trow, kvalid, s_tc, BH, R_HALF, KROT, DT, QKP,
                                               UPCAST, RNE)
            sn = _scores(qa, qb, qt, ka, kb, kt, BM, BN, True, HAS_TAIL, PREC, UPCAST, qa_lo, qb_lo, ka_lo, kb_lo,
                         QKP)
            s += tl.where(far, 0.0, sn)
        if need_far:
            frow = b.to(tl.int64) * s_fb + j.to(tl.int64) * s_ft       # the far table (one row: strides 0)
            ka, ka_lo, kb, kb_lo = _k_operands(xa, xb, KTF, frow, kvalid, s_fc, BH, R_HALF, KROT, DT, QKP,
                                               UPCAST, RNE)
            sf = _scores(fa, fb, ft, ka, kb, kt, BM, BN, True, HAS_TAIL, PREC, UPCAST, fa_lo, fb_lo, ka_lo, kb_lo,
                         QKP)
            s += tl.where(far, sf, 0.0)
    return s


def _rot_args(rot, q, D: int, dtype) -> tuple[list, list, dict]:
    """(pointers QN QF KT KTF QP KP VIS, scalars MWIN s_nt s_nh s_tc s_tb s_tt s_kpb s_vis s_fc s_fb s_ft,
    constexprs)."""
    if rot is None:
        return [q] * 7, [0] * 11, {}
    qk = ("bf16", "bf16x3", "fp32")[rot.qkp]
    meta = tile_meta(D, rot.rotary_dim, rot.interleaved, dtype, qk)
    qn = rot.qn
    qf = rot.qf if rot.qf is not None else qn
    kt = rot.ktab if rot.ktab is not None else qn
    ktf = rot.ktab_far if rot.ktab_far is not None else kt
    qp = rot.qpos.to(torch.float64) if rot.qpos is not None else qn
    kp = rot.kpos.to(torch.float64) if rot.kpos is not None else qn
    vis = rot.visual if rot.visual is not None else qn
    s_tc, s_tb, s_tt = rot.strides(rot.ktab)
    s_kpb = kp.stride(0) if rot.kpos is not None and kp.shape[0] > 1 else 0
    s_vis = vis.stride(0) if rot.visual is not None else 0
    const = dict(QROT=True, KROT=rot.ktab is not None, MAP=int(rot.map_code), ROT=meta["ROT"], BH=meta["BH"],
                 R_HALF=meta["R_HALF"], BTL=meta["BT"], INTERLEAVED=meta["INTERLEAVED"], HAS_TAIL=meta["HAS_TAIL"],
                 QKP=meta["QKP"], UPCAST=meta["UPCAST"],
                 RNE=bool(meta["UPCAST"] and dtype == torch.bfloat16 and meta["QKP"] == 0))
    return ([qn, qf, kt, ktf, qp, kp, vis], [int(rot.window), qn.stride(0), qn.stride(1), s_tc, s_tb, s_tt, s_kpb,
                                              s_vis, *rot.strides(rot.ktab_far)], const)

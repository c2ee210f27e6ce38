"""Triton flash-attention engine over block-sparse structured masks.

Forward, per (query block, query head)::

    for each key block kb listed for the query block (BlockLists, query-major CSR):
        s   = (q_rot . k_rot^T) * scale * log2(e)          fp32, tl.dot
        s   = where(allowed(i, j), s, -inf)                 only for blocks flagged "masked"
        m'  = max(m, rowmax(s)); p = exp2(s - m')
        l   = l * exp2(m - m') + rowsum(p); acc = acc * exp2(m - m') + p @ v
    out = acc / l ; lse = (m + log2 l) * ln 2               (natural log, fp32 [Hq, T])

Backward (FlashAttention-2): delta = rowsum(out * dout); one kernel per
(query block, query head) accumulates dq over the same list; one kernel per
(key block, key head) walks the transposed list over every query head of its
GQA group and accumulates dk and dv in registers (no atomics):

    p = exp2(s - lse * log2 e); dp = dout @ v^T; ds = p * (dp - delta)
    dv += p^T @ dout ; dk += scale * ds^T @ q_rot ; dq += scale * ds @ k_rot

allowed(i, j) = ((doc(i) == doc(j) and in_window) or row_start(i) <= j < row_start(i) + num_anchors)
                and (j <= i when causal) and j < T

With rotary embedding (ROPE), q and k tiles are loaded as their two rotary
halves (pairs (p, p + R/2) or (2p, 2p + 1)) plus the untouched tail, rotated
in registers with theta = position * inv_freq (fp64 product reduced mod 2*pi,
fp32 cos/sin), and the scores are the sum of three dots. The backward rotates
dq and dk back by -theta in registers. Inputs are converted to fp32 at load;
rotated q/k are rounded to the input dtype before the dots (exactly what
apply_rope then attention computes); outputs are rounded once at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TWO_PI = 6.283185307179586
INV_TWO_PI = 0.15915494309189535
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# kernels may only read globals that are constexpr
_TWO_PI = tl.constexpr(TWO_PI)
_INV_TWO_PI = tl.constexpr(INV_TWO_PI)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST (Triton interpreter with bf16, which has no bf16
    arithmetic) multiplies the already-rounded operands in fp32 instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cos_sin(pos_ptr, rows, rmask, inv_freq_ptr, BH: tl.constexpr, R_HALF: tl.constexpr, rope_scaling):
    """fp32 cos, sin [len(rows), BH] of theta = pos * inv_freq (fp64, reduced mod 2*pi), times scaling."""
    p = tl.arange(0, BH)
    f = tl.load(inv_freq_ptr + p, mask=p < R_HALF, other=0.0).to(tl.float64)
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.float64)
    th = pos[:, None] * f[None, :]
    th = th - tl.floor(th * _INV_TWO_PI) * _TWO_PI
    th32 = th.to(tl.float32)
    return tl.cos(th32) * rope_scaling, tl.sin(th32) * rope_scaling


@triton.jit
def _pair_cols(BH: tl.constexpr, R_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    p = tl.arange(0, BH)
    if INTERLEAVED:
        ca = 2 * p
        cb = 2 * p + 1
    else:
        ca = p
        cb = p + R_HALF
    return ca, cb, p < R_HALF


@triton.jit
def _ld(ptrs, rmask, cmask, ROWB: tl.constexpr, COLB: tl.constexpr):
    """Load a 2-D tile, bounds-checking rows and/or columns only where they can be out of range
    (blocks that need no element mask lie inside the tokens: their loads carry no predicate)."""
    if ROWB:
        if COLB:
            return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if COLB:
            return tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _load_qk_tile(X, rows, rmask, stride_t, POS, INV_FREQ, rope_scaling,
                  BM: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, BH: tl.constexpr,
                  R_HALF: tl.constexpr, BT: tl.constexpr, INTERLEAVED: tl.constexpr,
                  ROPE: tl.constexpr, HAS_TAIL: tl.constexpr, ROWB: tl.constexpr):
    """(a, b, tail, cos, sin) of a q or k tile; a/b rotated, all in the input dtype."""
    DT = X.dtype.element_ty
    base = X + rows[:, None].to(tl.int64) * stride_t
    if ROPE:
        ca, cb, pmask = _pair_cols(BH, R_HALF, INTERLEAVED)
        cos, sin = _cos_sin(POS, rows, rmask, INV_FREQ, BH, R_HALF, rope_scaling)
        xa = _ld(base + ca[None, :], rmask, pmask, ROWB, R_HALF != BH).to(tl.float32)
        xb = _ld(base + cb[None, :], rmask, pmask, ROWB, R_HALF != BH).to(tl.float32)
        a = (xa * cos - xb * sin).to(DT)
        b = (xb * cos + xa * sin).to(DT)
    else:
        cos = tl.zeros([BM, BH], dtype=tl.float32)
        sin = cos
        a = tl.zeros([BM, BH], dtype=DT)
        b = a
    if HAS_TAIL:
        c = ROT + tl.arange(0, BT)
        t = _ld(base + c[None, :], rmask, c < D, ROWB, D - ROT != BT)
    else:
        t = tl.zeros([BM, BT], dtype=DT)
    return a, b, t, cos, sin


@triton.jit
def _allowed2(r, c, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The element mask over a 2-D grid: r, q_doc, q_row broadcast along the query axis and
    c, k_doc along the key axis (either orientation: [BM, BN] or, transposed, [BN, BM])."""
    ok = q_doc == k_doc
    if HAS_WINDOW:
        if CAUSAL:
            ok = ok & (r - c < WINDOW)
        else:
            diff = r - c
            ok = ok & (diff < WINDOW) & (diff > -WINDOW)
    anchor = (c >= q_row) & (c < q_row + NUM_ANCHORS)
    ok = ok | anchor
    if CAUSAL:
        ok = ok & (c <= r)
    return ok & (c < T)


@triton.jit
def _allowed(rows, cols, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The element mask of one (query block, key block) tile, [BM, BN]."""
    return _allowed2(rows[:, None], cols[None, :], q_doc[:, None], q_row[:, None], k_doc[None, :], T,
                     NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)


@triton.jit
def _scores(qa, qb, qt, ka, kb, kt, BM: tl.constexpr, BN: tl.constexpr, ROPE: tl.constexpr,
            HAS_TAIL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    s = tl.zeros([BM, BN], dtype=tl.float32)
    if ROPE:
        s += _dot(qa, tl.trans(ka), PREC, UPCAST)
        s += _dot(qb, tl.trans(kb), PREC, UPCAST)
    if HAS_TAIL:
        s += _dot(qt, tl.trans(kt), PREC, UPCAST)
    return s


@triton.jit
def _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row, dcols, dmask,
              POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling, s_kt, s_vt,
              D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
              INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              MASKED: tl.constexpr):
    """One key block of the online softmax; MASKED applies the element mask and bounds."""
    DT = Kh.dtype.element_ty
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    ka, kb, kt, _kc, _ks = _load_qk_tile(Kh, cols, cmask, s_kt, POS, INV_FREQ, rope_scaling, BLOCK_N, D,
                                         ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED)
    v = _ld(Vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :], cmask, dmask, MASKED, D != BD)
    s = _scores(qa, qb_, qt, ka, kb, kt, BLOCK_M, BLOCK_N, ROPE, HAS_TAIL, PREC, UPCAST) * qk_scale_log2
    if MASKED:
        k_doc = tl.load(DOC_START + cols, mask=cmask, other=-2)
        ok = _allowed(rows, cols, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(DT), v, PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, POS, INV_FREQ, DOC_START, ROW_START, Q_OFF, Q_NFULL, KV_IDX,
    T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # last query blocks first: under a causal mask they visit the most key blocks
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    Kh = K + hk * s_kh
    Vh = V + hk * s_vh
    qa, qb_, qt, _c, _s = _load_qk_tile(Q + h * s_qh, rows, rmask, s_qt, POS, INV_FREQ, rope_scaling, BLOCK_M,
                                        D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, True)
    q_doc = tl.load(DOC_START + rows, mask=rmask, other=-1)
    q_row = tl.load(ROW_START + rows, mask=rmask, other=-1)
    dcols = tl.arange(0, BD)
    dmask = dcols < D

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    start = tl.load(Q_OFF + qb)
    mid = start + tl.load(Q_NFULL + qb)
    end = tl.load(Q_OFF + qb + 1)
    # the list holds a query block's unmasked key blocks first, then those needing the mask.
    # Each iteration reads the next block's index (as FlexAttention does), so the K/V tile
    # addresses are loop-carried and the pipeliner can fetch tiles num_stages - 1 blocks ahead;
    # indexing the list inside the iteration spends one of those stages on the index load.
    kbi = tl.load(KV_IDX + start, mask=start < mid, other=0)
    for e in range(start, mid):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < mid, other=0)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row,
                                  dcols, dmask, POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
                                  rope_scaling, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                                  INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, False)
        kbi = nxt
    kbi = tl.load(KV_IDX + mid, mask=mid < end, other=0)
    for e in range(mid, end):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < end, other=0)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row,
                                  dcols, dmask, POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
                                  rope_scaling, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                                  INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True)
        kbi = nxt
    l_i = tl.where(rmask, l_i, 1.0)      # padding rows past T see no key
    out = acc / l_i[:, None]
    tl.store(O + h * s_oh + rows[:, None].to(tl.int64) * s_ot + dcols[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + h.to(tl.int64) * T + rows, lse, mask=rmask)


@triton.jit
def _store_grad(X, rows, rmask, stride_t, ga, gb, gt, cos, sin, scale,
                D: tl.constexpr, ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
                INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Store scale * (gradient w.r.t. the unrotated input): halves rotated back by -theta."""
    DT = X.dtype.element_ty
    base = X + rows[:, None].to(tl.int64) * stride_t
    if ROPE:
        ca, cb, pmask = _pair_cols(BH, R_HALF, INTERLEAVED)
        m = rmask[:, None] & pmask[None, :]
        # r_a = a cos - b sin, r_b = b cos + a sin  =>  d a = g_a cos + g_b sin, d b = g_b cos - g_a sin
        da = (ga * cos + gb * sin) * scale
        db = (gb * cos - ga * sin) * scale
        tl.store(base + ca[None, :], da.to(DT), mask=m)
        tl.store(base + cb[None, :], db.to(DT), mask=m)
    if HAS_TAIL:
        c = ROT + tl.arange(0, BT)
        tl.store(base + c[None, :], (gt * scale).to(DT), mask=rmask[:, None] & (c < D)[None, :])


@triton.jit
def _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows, q_doc, q_row, dcols, dmask,
             POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling, s_kt, s_vt,
             D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
             INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             MASKED: tl.constexpr):
    DT = Kh.dtype.element_ty
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    ka, kb, kt, _kc, _ks = _load_qk_tile(Kh, cols, cmask, s_kt, POS, INV_FREQ, rope_scaling, BLOCK_N, D,
                                         ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED)
    v = _ld(Vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :], cmask, dmask, MASKED, D != BD)
    s = _scores(qa, qb_, qt, ka, kb, kt, BLOCK_M, BLOCK_N, ROPE, HAS_TAIL, PREC, UPCAST) * qk_scale_log2
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        k_doc = tl.load(DOC_START + cols, mask=cmask, other=-2)
        ok = _allowed(rows, cols, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = (p * (dp - delta[:, None])).to(DT)
    if ROPE:
        dqa += _dot(ds, ka, PREC, UPCAST)
        dqb += _dot(ds, kb, PREC, UPCAST)
    if HAS_TAIL:
        dqt += _dot(ds, kt, PREC, UPCAST)
    return dqa, dqb, dqt


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, POS, INV_FREQ, DOC_START, ROW_START, Q_OFF, Q_NFULL, KV_IDX,
    T, NUM_ANCHORS, WINDOW, qk_scale_log2, sm_scale, rope_scaling,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    Kh = K + hk * s_kh
    Vh = V + hk * s_vh
    qa, qb_, qt, qcos, qsin = _load_qk_tile(Q + h * s_qh, rows, rmask, s_qt, POS, INV_FREQ, rope_scaling,
                                            BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, True)
    dcols = tl.arange(0, BD)
    dmask = dcols < D
    do = tl.load(DO + h * s_doh + rows[:, None].to(tl.int64) * s_dot + dcols[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse2 = tl.load(LSE + h.to(tl.int64) * T + rows, mask=rmask, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + h.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    q_doc = tl.load(DOC_START + rows, mask=rmask, other=-1)
    q_row = tl.load(ROW_START + rows, mask=rmask, other=-1)
    dqa = tl.zeros([BLOCK_M, BH], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, BH], dtype=tl.float32)
    dqt = tl.zeros([BLOCK_M, BT], dtype=tl.float32)
    start = tl.load(Q_OFF + qb)
    mid = start + tl.load(Q_NFULL + qb)
    end = tl.load(Q_OFF + qb + 1)
    kbi = tl.load(KV_IDX + start, mask=start < mid, other=0)
    for e in range(start, mid):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < mid, other=0)
        dqa, dqb, dqt = _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows,
                                 q_doc, q_row, dcols, dmask, POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW,
                                 qk_scale_log2, rope_scaling, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF,
                                 BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, False)
        kbi = nxt
    kbi = tl.load(KV_IDX + mid, mask=mid < end, other=0)
    for e in range(mid, end):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < end, other=0)
        dqa, dqb, dqt = _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows,
                                 q_doc, q_row, dcols, dmask, POS, INV_FREQ, DOC_START, T, NUM_ANCHORS, WINDOW,
                                 qk_scale_log2, rope_scaling, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF,
                                 BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True)
        kbi = nxt
    _store_grad(DQ + h * s_dqh, rows, rmask, s_dqt, dqa, dqb, dqt, qcos, qsin, sm_scale,
                D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL)


@triton.jit
def _dkdv_step(dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh, qbi, cols, k_doc, dcols, dmask,
               POS, INV_FREQ, DOC_START, ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling,
               s_qt, s_dot,
               D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
               INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               MASKED: tl.constexpr):
    """One query block of the key block's dk, dv, computed key-major ([BLOCK_N, BLOCK_M]
    tiles: s^T = k q^T), so that p^T and ds^T come out of their products in the orientation
    the dv and dk products take, with no transpose of a register tile in between."""
    DT = Qh.dtype.element_ty
    rows = qbi * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    qa, qb_, qt, _qc, _qs = _load_qk_tile(Qh, rows, rmask, s_qt, POS, INV_FREQ, rope_scaling, BLOCK_M, D, ROT,
                                          BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED)
    do = _ld(DOh + rows[:, None].to(tl.int64) * s_dot + dcols[None, :], rmask, dmask, MASKED, D != BD)
    if MASKED:
        lse2 = tl.load(LSEh + rows, mask=rmask, other=float("inf")) * _LOG2E
        delta = tl.load(DELTAh + rows, mask=rmask, other=0.0)
    else:
        lse2 = tl.load(LSEh + rows) * _LOG2E
        delta = tl.load(DELTAh + rows)
    s_t = _scores(ka, kb, kt, qa, qb_, qt, BLOCK_N, BLOCK_M, ROPE, HAS_TAIL, PREC, UPCAST) * qk_scale_log2
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:
        q_doc = tl.load(DOC_START + rows, mask=rmask, other=-1)
        q_row = tl.load(ROW_START + rows, mask=rmask, other=-1)
        ok_t = _allowed2(rows[None, :], cols[:, None], q_doc[None, :], q_row[None, :], k_doc[:, None], T,
                         NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)
        p_t = tl.where(ok_t, p_t, 0.0)
    dv += _dot(p_t.to(DT), do, PREC, UPCAST)
    dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
    ds_t = (p_t * (dp_t - delta[None, :])).to(DT)
    if ROPE:
        dka += _dot(ds_t, qa, PREC, UPCAST)
        dkb += _dot(ds_t, qb_, PREC, UPCAST)
    if HAS_TAIL:
        dkt += _dot(ds_t, qt, PREC, UPCAST)
    return dka, dkb, dkt, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, POS, INV_FREQ, DOC_START, ROW_START, K_OFF, K_NFULL, Q_IDX,
    T, NUM_ANCHORS, WINDOW, qk_scale_log2, sm_scale, rope_scaling,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    kbi = tl.program_id(0)
    hk = tl.program_id(1)
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    ka, kb, kt, kcos, ksin = _load_qk_tile(K + hk * s_kh, cols, cmask, s_kt, POS, INV_FREQ, rope_scaling,
                                           BLOCK_N, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, True)
    dcols = tl.arange(0, BD)
    dmask = dcols < D
    v = tl.load(V + hk * s_vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0)
    k_doc = tl.load(DOC_START + cols, mask=cmask, other=-2)
    dka = tl.zeros([BLOCK_N, BH], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, BH], dtype=tl.float32)
    dkt = tl.zeros([BLOCK_N, BT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    start = tl.load(K_OFF + kbi)
    mid = start + tl.load(K_NFULL + kbi)
    end = tl.load(K_OFF + kbi + 1)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qh = Q + h * s_qh
        DOh = DO + h * s_doh
        LSEh = LSE + h.to(tl.int64) * T
        DELTAh = DELTA + h.to(tl.int64) * T
        qbi = tl.load(Q_IDX + start, mask=start < mid, other=0)
        for e in range(start, mid):
            nxt = tl.load(Q_IDX + e + 1, mask=e + 1 < mid, other=0)
            dka, dkb, dkt, dv = _dkdv_step(dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh,
                                           qbi, cols, k_doc, dcols, dmask, POS, INV_FREQ, DOC_START,
                                           ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling, s_qt,
                                           s_dot, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE,
                                           HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, False)
            qbi = nxt
        qbi = tl.load(Q_IDX + mid, mask=mid < end, other=0)
        for e in range(mid, end):
            nxt = tl.load(Q_IDX + e + 1, mask=e + 1 < end, other=0)
            dka, dkb, dkt, dv = _dkdv_step(dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh,
                                           qbi, cols, k_doc, dcols, dmask, POS, INV_FREQ, DOC_START,
                                           ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, rope_scaling, s_qt,
                                           s_dot, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE,
                                           HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True)
            qbi = nxt
    _store_grad(DK + hk * s_dkh, cols, cmask, s_dkt, dka, dkb, dkt, kcos, ksin, sm_scale,
                D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL)
    tl.store(DV + hk * s_dvh + cols[:, None].to(tl.int64) * s_dvt + dcols[None, :], dv.to(DV.dtype.element_ty),
             mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, T, s_ot, s_oh, s_dot, s_doh,
                           D: tl.constexpr, BD: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d out[t, h, d] * dout[t, h, d] in fp32, reading each input once in its dtype."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    d = tl.arange(0, BD)
    m = rmask[:, None] & (d < D)[None, :]
    o = tl.load(O + h * s_oh + rows[:, None].to(tl.int64) * s_ot + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + h * s_doh + rows[:, None].to(tl.int64) * s_dot + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rmask)


# ---------------------------------------------------------------------------
# launchers


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def tile_meta(D: int, rotary_dim: int, interleaved: bool, dtype: torch.dtype) -> dict:
    """Constexprs describing the head layout: rotary halves (BH wide) and the tail (BT wide)."""
    rope = rotary_dim > 0
    tail = D - rotary_dim
    return dict(
        D=D, BD=_pow2(D), ROT=rotary_dim, BH=_pow2(rotary_dim // 2) if rope else 16,
        R_HALF=max(rotary_dim // 2, 1), BT=_pow2(tail) if tail > 0 else 16,
        INTERLEAVED=bool(interleaved), ROPE=rope, HAS_TAIL=tail > 0,
        PREC="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=dtype == torch.bfloat16 and _interpreting(),
    )


# opt-in shared memory per block: H100/H200 227 KB, A100 163 KB, sm_86/sm_89 (RTX 30/40, L4,
# L40S, A10) 99 KB
SMEM_HOPPER = 232448
SMEM_LARGE = 160 * 1024


def default_config(head_dim: int, dtype: torch.dtype, interpret: bool, smem_per_block: int | None = None) -> dict:
    """Launch config: block sizes of the forward and of the backward, warps and stages.

    bf16/fp16 with head_dim <= 128 on GPUs with at least 160 KB of shared memory per block:
    the fastest of the configs timed on an H200 by ``benchmarks/bench_anchor_attention.py
    --sweep`` (64x64 blocks, 4 warps; 3 stages forward, 2 backward). Wider tiles (fp32,
    head_dim > 128) and GPUs with less shared memory (``smem_per_block``, default: an H100's)
    get smaller blocks and fewer stages, chosen so that every kernel fits (the sizes come from
    compiling them for sm_90a, sm_80 and sm_89: tests/attention/test_flash_attn_aot.py).
    """
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BWD_BLOCK_M": 16, "BWD_BLOCK_N": 16,
                "num_warps": 4, "num_stages": 1, "bwd_num_warps": 4, "bwd_num_stages": 1}
    limit = SMEM_HOPPER if smem_per_block is None else int(smem_per_block)
    wide = dtype == torch.float32 or head_dim > 128
    widest = dtype == torch.float32 and head_dim > 128
    cfg = {"num_warps": 4, "bwd_num_warps": 4}
    if limit >= SMEM_LARGE:
        if not wide:
            return dict(cfg, BLOCK_M=64, BLOCK_N=64, BWD_BLOCK_M=64, BWD_BLOCK_N=64, num_stages=3, bwd_num_stages=2)
        return dict(cfg, BLOCK_M=64, BLOCK_N=32 if head_dim > 128 else 64, BWD_BLOCK_M=32,
                    BWD_BLOCK_N=32 if widest else 64, num_stages=2, bwd_num_stages=1 if widest else 2)
    if widest:
        return dict(cfg, BLOCK_M=32, BLOCK_N=16, BWD_BLOCK_M=16, BWD_BLOCK_N=32, num_stages=1, bwd_num_stages=1)
    return dict(cfg, BLOCK_M=64, BLOCK_N=32 if wide else 64, BWD_BLOCK_M=32, BWD_BLOCK_N=32 if wide else 64,
                num_stages=2, bwd_num_stages=1 if wide else 2)


def _rope_args(q, rope):
    """(pos, inv_freq, rotary_dim, interleaved, scaling) or dummies when rope is None."""
    if rope is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=q.device)
        return dummy, dummy, 0, False, 1.0
    return rope


def attn_forward(q, k, v, lists, num_anchors: int, causal: bool, window: int | None, softmax_scale: float,
                 rope, config: dict):
    """q: [T, Hq, D]; k, v: [T, Hk, D] (last dim contiguous); lists: BlockLists for
    (BLOCK_M, BLOCK_N); rope: None or (positions [T], inv_freq fp32 [R/2], R, interleaved, scaling).
    Returns out [T, Hq, D] (q's dtype) and lse fp32 [Hq, T]."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(HQ, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    pos, inv_freq, rot, inter, scaling = _rope_args(q, rope)
    bm, bn = lists.block_m, lists.block_n
    grid = (triton.cdiv(T, bm), HQ)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, pos, inv_freq, lists.doc_start, lists.row_start,
        lists.q_offsets, lists.q_nfull, lists.q_kv_idx,
        T, num_anchors, window or 0, softmax_scale * LOG2E, float(scaling),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=HQ // HK, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=window is not None,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        **tile_meta(D, rot, inter, q.dtype),
    )
    return out, lse


def attn_backward(dout, q, k, v, out, lse, lists, num_anchors: int, causal: bool, window: int | None,
                  softmax_scale: float, rope, config: dict, dlse=None):
    """Gradients (dq, dk, dv) in the input dtype; ``lists`` are for (BWD_BLOCK_M, BWD_BLOCK_N)
    and carry the transposed (key-major) lists. ``dlse`` [Hq, T] (gradient reaching the lse, or
    None) enters as ds = p * (dp - delta + dlse), so it is folded into delta."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if T == 0:
        return dq, dk, dv
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    delta = torch.empty(HQ, T, dtype=torch.float32, device=q.device)   # rowsum(out * dout), [Hq, T]
    block_t = 16 if _interpreting() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(T, block_t), HQ)](
        out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        D=D, BD=_pow2(D), BLOCK_T=block_t, num_warps=4)
    if dlse is not None:
        delta -= dlse.float()
    pos, inv_freq, rot, inter, scaling = _rope_args(q, rope)
    bm, bn = lists.block_m, lists.block_n
    meta = tile_meta(D, rot, inter, q.dtype)
    common = dict(GROUP=HQ // HK, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=window is not None,
                  num_warps=config.get("bwd_num_warps", 4), num_stages=config.get("bwd_num_stages", 2), **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), HQ)](
        q, k, v, dout, dq, lse, delta, pos, inv_freq, lists.doc_start, lists.row_start,
        lists.q_offsets, lists.q_nfull, lists.q_kv_idx,
        T, num_anchors, window or 0, softmax_scale * LOG2E, softmax_scale, float(scaling),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), **common,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), HK)](
        q, k, v, dout, dk, dv, lse, delta, pos, inv_freq, lists.doc_start, lists.row_start,
        lists.k_offsets, lists.k_nfull, lists.k_q_idx,
        T, num_anchors, window or 0, softmax_scale * LOG2E, softmax_scale, float(scaling),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------
# ahead-of-time compilation (tests compile specialisations for sm_90a)

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FWD_PTRS = ("Q", "K", "V", "O", "LSE", "POS", "INV_FREQ", "DOC_START", "ROW_START", "Q_OFF", "Q_NFULL", "KV_IDX")


def aot_specializations(cases=None):
    """Yield (name, kernel, signature, constexprs, num_warps, num_stages) for ahead-of-time compiles.

    ``cases``: iterable of (head_dim, rotary_dim, interleaved, dtype, causal, window, group);
    by default the benchmark's bf16/128 case with and without rope, plus odd head dims and fp32.
    """
    if cases is None:
        cases = [(128, 0, False, torch.bfloat16, True, False, 4), (128, 128, False, torch.bfloat16, True, False, 4),
                 (96, 48, True, torch.float16, False, True, 1), (80, 80, False, torch.float32, True, True, 2),
                 (256, 0, False, torch.bfloat16, True, False, 4), (192, 192, False, torch.bfloat16, True, False, 1)]
    delta_done = set()
    for D, rot, inter, dtype, causal, has_window, group in cases:
        ty = _TL_DTYPE[dtype]
        cfg = default_config(D, dtype, interpret=False)
        meta = tile_meta(D, rot, inter, dtype)
        pos_t = "i64" if rot else "fp32"
        for kind in ("fwd", "dq", "dkdv"):
            if kind == "fwd":
                fn = _attn_fwd_kernel
                ptrs = _FWD_PTRS
                ints = ("T", "NUM_ANCHORS", "WINDOW")
                floats = ("qk_scale_log2", "rope_scaling")
                strides = ("s_qt", "s_qh", "s_kt", "s_kh", "s_vt", "s_vh", "s_ot", "s_oh")
                bm, bn, nw, ns = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
            else:
                bm, bn, nw, ns = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"], cfg["bwd_num_warps"], cfg["bwd_num_stages"]
                ints = ("T", "NUM_ANCHORS", "WINDOW")
                floats = ("qk_scale_log2", "sm_scale", "rope_scaling")
                if kind == "dq":
                    fn = _attn_bwd_dq_kernel
                    ptrs = ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA", "POS", "INV_FREQ", "DOC_START", "ROW_START",
                            "Q_OFF", "Q_NFULL", "KV_IDX")
                    strides = ("s_qt", "s_qh", "s_kt", "s_kh", "s_vt", "s_vh", "s_dot", "s_doh", "s_dqt", "s_dqh")
                else:
                    fn = _attn_bwd_dkdv_kernel
                    ptrs = ("Q", "K", "V", "DO", "DK", "DV", "LSE", "DELTA", "POS", "INV_FREQ", "DOC_START",
                            "ROW_START", "K_OFF", "K_NFULL", "Q_IDX")
                    strides = ("s_qt", "s_qh", "s_kt", "s_kh", "s_vt", "s_vh", "s_dot", "s_doh", "s_dkt", "s_dkh",
                               "s_dvt", "s_dvh")
            const = dict(meta, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=has_window)
            sig = {n: "constexpr" for n in const}
            for n in ptrs:
                if n in ("LSE", "DELTA", "INV_FREQ"):
                    sig[n] = "*fp32"
                elif n == "POS":
                    sig[n] = f"*{pos_t}"
                elif n in ("DOC_START", "ROW_START", "Q_OFF", "Q_NFULL", "KV_IDX", "K_OFF", "K_NFULL", "Q_IDX"):
                    sig[n] = "*i32"
                else:
                    sig[n] = f"*{ty}"
            for n in ints:
                sig[n] = "i32"
            for n in floats:
                sig[n] = "fp32"
            for n in strides:
                sig[n] = "i32"
            name = (f"attn_{kind}_d{D}_r{rot}{'i' if inter else 'h'}_{ty}_{'causal' if causal else 'full'}"
                    f"{'_win' if has_window else ''}_g{group}")
            yield name, fn, sig, const, nw, ns
        if (D, ty) not in delta_done:  # the backward's rowsum(out * dout), once per head_dim and dtype
            delta_done.add((D, ty))
            dsig = {"O": f"*{ty}", "DO": f"*{ty}", "DELTA": "*fp32", "T": "i32", "s_ot": "i32", "s_oh": "i32",
                    "s_dot": "i32", "s_doh": "i32", "D": "constexpr", "BD": "constexpr", "BLOCK_T": "constexpr"}
            yield (f"attn_delta_d{D}_{ty}", _attn_bwd_delta_kernel, dsig, {"D": D, "BD": _pow2(D), "BLOCK_T": 64},
                   4, 1)

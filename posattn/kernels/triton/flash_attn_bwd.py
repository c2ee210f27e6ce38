"""Backward kernels of the flash-attention engine (FlashAttention-2; see flash_attn.py):
delta = rowsum(out * dout); dq per (query block, query head); dk, dv per (key block, key head)
over the transposed list and the head's GQA group, in registers (no atomics)."""
from __future__ import annotations

import triton
import triton.language as tl

from posattn.kernels.triton.flash_attn_fwd import _map_scores, _q_side
from posattn.kernels.triton.flash_attn_tiles import (_LOG2E, _allowed, _allowed2, _dot, _grad_dot, _ld,
                                                     _load_qk_tile, _map_side, _pair_cols, _pair_far, _scores,
                                                     _tile_kinds)


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
def _store_grad_map(X, rows, rmask, stride_t, ga, gb, gfa, gfb, gt, cos, sin, fcos, fsin, scale,
                    D: tl.constexpr, ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
                    INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr):
    """_store_grad of a position map: the near pairs' halves (ga, gb) rotated back by the near
    rotation, the far pairs' (gfa, gfb) by the far one (fcos, fsin), summed."""
    DT = X.dtype.element_ty
    base = X + rows[:, None].to(tl.int64) * stride_t
    ca, cb, pmask = _pair_cols(BH, R_HALF, INTERLEAVED)
    m = rmask[:, None] & pmask[None, :]
    da = ((ga * cos + gb * sin) + (gfa * fcos + gfb * fsin)) * scale
    db = ((gb * cos - ga * sin) + (gfb * fcos - gfa * fsin)) * scale
    tl.store(base + ca[None, :], da.to(DT), mask=m)
    tl.store(base + cb[None, :], db.to(DT), mask=m)
    if HAS_TAIL:
        c = ROT + tl.arange(0, BT)
        tl.store(base + c[None, :], (gt * scale).to(DT), mask=rmask[:, None] & (c < D)[None, :])


@triton.jit
def _rot_grads(ga, gb, gfa, gfb, ds, far, need_near, need_far, xa, xb, xa_lo, xb_lo, xfa, xfb, xfa_lo, xfb_lo,
               MAP: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               QKP: tl.constexpr):
    """One tile's rotated-part gradient products, for dq (x = the k tile) and dk (x = the q tile,
    ds transposed): near pairs against the near rotation (ga, gb), far pairs against the far one
    (gfa, gfb; only with a position map, and only the products the tile needs)."""
    if MAP == 0:
        if ROPE:
            ga += _grad_dot(ds, xa, xa_lo, PREC, UPCAST, QKP)
            gb += _grad_dot(ds, xb, xb_lo, PREC, UPCAST, QKP)
    else:
        zero = tl.zeros_like(ds)
        if need_near:
            dsn = tl.where(far, zero, ds)
            ga += _grad_dot(dsn, xa, xa_lo, PREC, UPCAST, QKP)
            gb += _grad_dot(dsn, xb, xb_lo, PREC, UPCAST, QKP)
        if need_far:
            dsf = tl.where(far, ds, zero)
            gfa += _grad_dot(dsf, xfa, xfa_lo, PREC, UPCAST, QKP)
            gfb += _grad_dot(dsf, xfb, xfb_lo, PREC, UPCAST, QKP)
    return ga, gb, gfa, gfb


@triton.jit
def _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows, q_doc, q_row, dcols, dmask,
             COS, SIN, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, s_kt, s_vt,
             D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
             INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             MASKED: tl.constexpr, qa_lo, qb_lo, QKP: tl.constexpr,
             dqfa, dqfb, qfa, qfb, qfa_lo, qfb_lo, FKC, FKS, pq, vq, POSF, VIS, MAP_WIN, MAP: tl.constexpr):
    DT = Kh.dtype.element_ty
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    if MAP == 0:
        ka, kb, kt, _kc, _ks, ka_lo, kb_lo = _load_qk_tile(Kh, cols, cmask, s_kt, COS, SIN, BLOCK_N, D, ROT, BH,
                                                           R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED, QKP,
                                                           UPCAST)
        s = _scores(qa, qb_, qt, ka, kb, kt, BLOCK_M, BLOCK_N, ROPE, HAS_TAIL, PREC, UPCAST,
                    qa_lo, qb_lo, ka_lo, kb_lo, QKP)
        far = cols[None, :] < 0
        need_near = True
        need_far = False
        kfa, kfb, kfa_lo, kfb_lo = ka, kb, ka_lo, kb_lo
    else:
        s, far, need_near, need_far, ka, kb, kt, ka_lo, kb_lo, kfa, kfb, kfa_lo, kfb_lo = _map_scores(
            qa, qb_, qt, qfa, qfb, qfa_lo, qfb_lo, qa_lo, qb_lo, Kh, cols, cmask, rows < T, s_kt,
            COS, SIN, FKC, FKS, pq, vq, POSF, VIS, MAP_WIN, D, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
            INTERLEAVED, HAS_TAIL, PREC, UPCAST, QKP, MAP)
    s = s * qk_scale_log2
    v = _ld(Vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :], cmask, dmask, MASKED, D != BD)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        k_doc = tl.load(DOC_START + cols, mask=cmask, other=-2)
        ok = _allowed(rows, cols, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = (p * (dp - delta[:, None])).to(DT)
    dqa, dqb, dqfa, dqfb = _rot_grads(dqa, dqb, dqfa, dqfb, ds, far, need_near, need_far, ka, kb, ka_lo, kb_lo,
                                      kfa, kfb, kfa_lo, kfb_lo, MAP, ROPE, PREC, UPCAST, QKP)
    if HAS_TAIL:
        dqt += _dot(ds, kt, PREC, UPCAST)
    return dqa, dqb, dqt, dqfa, dqfb


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, COS, SIN, KCOS, KSIN, DOC_START, ROW_START, Q_OFF, Q_NFULL, KV_IDX,
    T, NUM_ANCHORS, WINDOW, QTD, KTD, qk_scale_log2, sm_scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh, s_tab,
    FQC, FQS, FKC, FKS, POSF, VIS, MAP_WIN,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    QKP: tl.constexpr, MAP: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    (Kh, Vh, KC, KS, FKCh, FKSh, qa, qb_, qt, qcos, qsin, qa_lo, qb_lo, qfa, qfb, qfcos, qfsin, qfa_lo, qfb_lo, pq,
     vq) = _q_side(Q, K, V, COS, SIN, KCOS, KSIN, FQC, FQS, FKC, FKS, POSF, VIS, h, hk, rows, rmask, QTD, KTD,
                   s_qt, s_qh, s_kh, s_vh, s_tab, BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL,
                   QKP, UPCAST, MAP)
    dcols = tl.arange(0, BD)
    dmask = dcols < D
    do = tl.load(DO + h.to(tl.int64) * s_doh + rows[:, None].to(tl.int64) * s_dot + dcols[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse2 = tl.load(LSE + h.to(tl.int64) * T + rows, mask=rmask, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + h.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    q_doc = tl.load(DOC_START + rows, mask=rmask, other=-1)
    q_row = tl.load(ROW_START + rows, mask=rmask, other=-1)
    dqa = tl.zeros([BLOCK_M, BH], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, BH], dtype=tl.float32)
    dqt = tl.zeros([BLOCK_M, BT], dtype=tl.float32)
    dqfa = tl.zeros([BLOCK_M, BH], dtype=tl.float32)      # far pairs (a position map)
    dqfb = tl.zeros([BLOCK_M, BH], dtype=tl.float32)
    start = tl.load(Q_OFF + qb)
    mid = start + tl.load(Q_NFULL + qb)
    end = tl.load(Q_OFF + qb + 1)
    kbi = tl.load(KV_IDX + start, mask=start < mid, other=0)
    for e in range(start, mid):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < mid, other=0)
        dqa, dqb, dqt, dqfa, dqfb = _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows,
                                             q_doc, q_row, dcols, dmask, KC, KS, DOC_START, T, NUM_ANCHORS, WINDOW,
                                             qk_scale_log2, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF,
                                             BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST,
                                             False, qa_lo, qb_lo, QKP, dqfa, dqfb, qfa, qfb, qfa_lo, qfb_lo,
                                             FKCh, FKSh, pq, vq, POSF, VIS, MAP_WIN, MAP)
        kbi = nxt
    kbi = tl.load(KV_IDX + mid, mask=mid < end, other=0)
    for e in range(mid, end):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < end, other=0)
        dqa, dqb, dqt, dqfa, dqfb = _dq_step(dqa, dqb, dqt, qa, qb_, qt, do, lse2, delta, Kh, Vh, kbi, rows,
                                             q_doc, q_row, dcols, dmask, KC, KS, DOC_START, T, NUM_ANCHORS, WINDOW,
                                             qk_scale_log2, s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF,
                                             BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST,
                                             True, qa_lo, qb_lo, QKP, dqfa, dqfb, qfa, qfb, qfa_lo, qfb_lo,
                                             FKCh, FKSh, pq, vq, POSF, VIS, MAP_WIN, MAP)
        kbi = nxt
    if MAP == 0:
        _store_grad(DQ + h.to(tl.int64) * s_dqh, rows, rmask, s_dqt, dqa, dqb, dqt, qcos, qsin, sm_scale,
                    D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL)
    else:
        _store_grad_map(DQ + h.to(tl.int64) * s_dqh, rows, rmask, s_dqt, dqa, dqb, dqfa, dqfb, dqt, qcos, qsin,
                        qfcos, qfsin, sm_scale, D, ROT, BH, R_HALF, BT, INTERLEAVED, HAS_TAIL)


@triton.jit
def _dkdv_step(dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh, qbi, cols, k_doc, dcols, dmask,
               COS, SIN, DOC_START, ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
               s_qt, s_dot,
               D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
               INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               MASKED: tl.constexpr, ka_lo, kb_lo, QKP: tl.constexpr,
               dkfa, dkfb, kfa, kfb, kfa_lo, kfb_lo, FQC, FQS, pk, vk, POSF, VIS, MAP_WIN, MAP: tl.constexpr):
    """One query block of the key block's dk, dv, computed key-major ([BLOCK_N, BLOCK_M]
    tiles: s^T = k q^T), so that p^T and ds^T come out of their products in the orientation
    the dv and dk products take, with no transpose of a register tile in between. With a
    position map the q tile is rotated near and far (each only if the tile needs it) and the
    far pairs' dk gathers in dkfa, dkfb."""
    DT = Qh.dtype.element_ty
    rows = qbi * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    if MAP == 0:
        qa, qb_, qt, _qc, _qs, qa_lo, qb_lo = _load_qk_tile(Qh, rows, rmask, s_qt, COS, SIN, BLOCK_M, D, ROT, BH,
                                                            R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED, QKP,
                                                            UPCAST)
        s_t = _scores(ka, kb, kt, qa, qb_, qt, BLOCK_N, BLOCK_M, ROPE, HAS_TAIL, PREC, UPCAST,
                      ka_lo, kb_lo, qa_lo, qb_lo, QKP)
        far_t = rows[None, :] < 0
        need_near = True
        need_far = False
        qfa, qfb, qfa_lo, qfb_lo = qa, qb_, qa_lo, qb_lo
    else:
        pq, vq = _map_side(POSF, VIS, rows, rmask, MAP)
        far_t = _pair_far(pq[None, :], pk[:, None], vq[None, :], vk[:, None], MAP_WIN, MAP)
        need_near, need_far = _tile_kinds(far_t, (cols[:, None] < T) & (rows[None, :] < T))
        qa, qb_, _t0, _c0, _s0, qa_lo, qb_lo = _load_qk_tile(Qh, rows, rmask & need_near, s_qt, COS, SIN, BLOCK_M, D,
                                                             ROT, BH, R_HALF, BT, INTERLEAVED, True, False, True,
                                                             QKP, UPCAST)
        qfa, qfb, _t1, _c1, _s1, qfa_lo, qfb_lo = _load_qk_tile(Qh, rows, rmask & need_far, s_qt, FQC, FQS, BLOCK_M,
                                                                D, ROT, BH, R_HALF, BT, INTERLEAVED, True, False,
                                                                True, QKP, UPCAST)
        _a, _b, qt, _c2, _s2, _al, _bl = _load_qk_tile(Qh, rows, rmask, s_qt, COS, SIN, BLOCK_M, D, ROT, BH, R_HALF,
                                                       BT, INTERLEAVED, False, HAS_TAIL, True, QKP, UPCAST)
        s_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if need_near:
            s_t = _scores(ka, kb, kt, qa, qb_, qt, BLOCK_N, BLOCK_M, True, False, PREC, UPCAST,
                          ka_lo, kb_lo, qa_lo, qb_lo, QKP)
        if need_far:
            sf = _scores(kfa, kfb, kt, qfa, qfb, qt, BLOCK_N, BLOCK_M, True, False, PREC, UPCAST,
                         kfa_lo, kfb_lo, qfa_lo, qfb_lo, QKP)
            s_t = tl.where(far_t, sf, s_t)
        if HAS_TAIL:
            s_t += _dot(kt, tl.trans(qt), PREC, UPCAST)
    do = _ld(DOh + rows[:, None].to(tl.int64) * s_dot + dcols[None, :], rmask, dmask, MASKED, D != BD)
    if MASKED:
        lse2 = tl.load(LSEh + rows, mask=rmask, other=float("inf")) * _LOG2E
        delta = tl.load(DELTAh + rows, mask=rmask, other=0.0)
    else:
        lse2 = tl.load(LSEh + rows) * _LOG2E
        delta = tl.load(DELTAh + rows)
    s_t = s_t * qk_scale_log2
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
    dka, dkb, dkfa, dkfb = _rot_grads(dka, dkb, dkfa, dkfb, ds_t, far_t, need_near, need_far, qa, qb_, qa_lo, qb_lo,
                                      qfa, qfb, qfa_lo, qfb_lo, MAP, ROPE, PREC, UPCAST, QKP)
    if HAS_TAIL:
        dkt += _dot(ds_t, qt, PREC, UPCAST)
    return dka, dkb, dkt, dv, dkfa, dkfb


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, COS, SIN, KCOS, KSIN, DOC_START, ROW_START, K_OFF, K_NFULL, Q_IDX,
    T, NUM_ANCHORS, WINDOW, QTD, KTD, qk_scale_log2, sm_scale,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh, s_tab,
    FQC, FQS, FKC, FKS, POSF, VIS, MAP_WIN,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    QKP: tl.constexpr, MAP: tl.constexpr,
):
    kbi = tl.program_id(0)
    hk = tl.program_id(1)
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    KC = KCOS + (hk // KTD).to(tl.int64) * s_tab
    KS = KSIN + (hk // KTD).to(tl.int64) * s_tab
    ka, kb, kt, kcos, ksin, ka_lo, kb_lo = _load_qk_tile(K + hk.to(tl.int64) * s_kh, cols, cmask, s_kt, KC, KS,
                                                         BLOCK_N, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE,
                                                         HAS_TAIL, True, QKP, UPCAST)
    if MAP != 0:
        kfa, kfb, _t, kfcos, kfsin, kfa_lo, kfb_lo = _load_qk_tile(
            K + hk.to(tl.int64) * s_kh, cols, cmask, s_kt, FKC + (hk // KTD).to(tl.int64) * s_tab,
            FKS + (hk // KTD).to(tl.int64) * s_tab, BLOCK_N, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, False, True,
            QKP, UPCAST)
        pk, vk = _map_side(POSF, VIS, cols, cmask, MAP)
    else:
        kfa, kfb, kfa_lo, kfb_lo, kfcos, kfsin = ka, kb, ka_lo, kb_lo, kcos, ksin
        pk = tl.zeros([BLOCK_N], dtype=tl.float32)
        vk = tl.zeros([BLOCK_N], dtype=tl.int32)
    dcols = tl.arange(0, BD)
    dmask = dcols < D
    v = tl.load(V + hk.to(tl.int64) * s_vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0.0)
    k_doc = tl.load(DOC_START + cols, mask=cmask, other=-2)
    dka = tl.zeros([BLOCK_N, BH], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, BH], dtype=tl.float32)
    dkt = tl.zeros([BLOCK_N, BT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dkfa = tl.zeros([BLOCK_N, BH], dtype=tl.float32)      # far pairs (a position map)
    dkfb = tl.zeros([BLOCK_N, BH], dtype=tl.float32)
    start = tl.load(K_OFF + kbi)
    mid = start + tl.load(K_NFULL + kbi)
    end = tl.load(K_OFF + kbi + 1)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qh = Q + h.to(tl.int64) * s_qh
        DOh = DO + h.to(tl.int64) * s_doh
        LSEh = LSE + h.to(tl.int64) * T
        DELTAh = DELTA + h.to(tl.int64) * T
        QC = COS + (h // QTD).to(tl.int64) * s_tab
        QS = SIN + (h // QTD).to(tl.int64) * s_tab
        FQCh = FQC + (h // QTD).to(tl.int64) * s_tab
        FQSh = FQS + (h // QTD).to(tl.int64) * s_tab
        qbi = tl.load(Q_IDX + start, mask=start < mid, other=0)
        for e in range(start, mid):
            nxt = tl.load(Q_IDX + e + 1, mask=e + 1 < mid, other=0)
            dka, dkb, dkt, dv, dkfa, dkfb = _dkdv_step(
                dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh, qbi, cols, k_doc, dcols, dmask, QC, QS,
                DOC_START, ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, s_qt, s_dot, D, BD, BLOCK_M, BLOCK_N,
                ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, False,
                ka_lo, kb_lo, QKP, dkfa, dkfb, kfa, kfb, kfa_lo, kfb_lo, FQCh, FQSh, pk, vk, POSF, VIS, MAP_WIN,
                MAP)
            qbi = nxt
        qbi = tl.load(Q_IDX + mid, mask=mid < end, other=0)
        for e in range(mid, end):
            nxt = tl.load(Q_IDX + e + 1, mask=e + 1 < end, other=0)
            dka, dkb, dkt, dv, dkfa, dkfb = _dkdv_step(
                dka, dkb, dkt, dv, ka, kb, kt, v, Qh, DOh, LSEh, DELTAh, qbi, cols, k_doc, dcols, dmask, QC, QS,
                DOC_START, ROW_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, s_qt, s_dot, D, BD, BLOCK_M, BLOCK_N,
                ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True,
                ka_lo, kb_lo, QKP, dkfa, dkfb, kfa, kfb, kfa_lo, kfb_lo, FQCh, FQSh, pk, vk, POSF, VIS, MAP_WIN,
                MAP)
            qbi = nxt
    if MAP == 0:
        _store_grad(DK + hk.to(tl.int64) * s_dkh, cols, cmask, s_dkt, dka, dkb, dkt, kcos, ksin, sm_scale,
                    D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL)
    else:
        _store_grad_map(DK + hk.to(tl.int64) * s_dkh, cols, cmask, s_dkt, dka, dkb, dkfa, dkfb, dkt, kcos, ksin,
                        kfcos, kfsin, sm_scale, D, ROT, BH, R_HALF, BT, INTERLEAVED, HAS_TAIL)
    dv_ptrs = DV + hk.to(tl.int64) * s_dvh + cols[:, None].to(tl.int64) * s_dvt + dcols[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])


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
    h64 = h.to(tl.int64)
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(O + h64 * s_oh + r64 * s_ot + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + h64 * s_doh + r64 * s_dot + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + h64 * T + rows, tl.sum(o * do, 1), mask=rmask)

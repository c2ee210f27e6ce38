"""Forward kernel of the flash-attention engine (see flash_attn.py for the formula)."""
from __future__ import annotations

import triton
import triton.language as tl

from posattn.kernels.triton.flash_attn_tiles import (_LN2, _allowed, _dot, _ld, _load_qk_tile, _map_side, _pair_far,
                                                     _scores, _tile_kinds)


@triton.jit
def _map_scores(qa, qb_, qt, qfa, qfb, qfa_lo, qfb_lo, qa_lo, qb_lo, Kh, cols, cmask, rmask, s_kt,
                COS, SIN, FKC, FKS, pq, vq, POSF, VIS, MAP_WIN,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
                INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                QKP: tl.constexpr, MAP: tl.constexpr):
    """Scores [BM, BN] (unscaled) of a tile under a position map, and what the backward needs:
    (s, far, need_near, need_far, ka, kb, kt, ka_lo, kb_lo, kfa, kfb, kfa_lo, kfb_lo).

    The key tile is rotated near (COS/SIN) and far (FKC/FKS); each table is read only when the
    tile has a pair of that kind (masked-off loads fetch nothing) and each product is computed
    only then: a tile that straddles the window pays two rotary products, others one. The
    tail (dims past rotary_dim) is not rotated and is shared."""
    pk, vk = _map_side(POSF, VIS, cols, cmask, MAP)
    far = _pair_far(pq[:, None], pk[None, :], vq[:, None], vk[None, :], MAP_WIN, MAP)
    need_near, need_far = _tile_kinds(far, rmask[:, None] & cmask[None, :])
    ka, kb, _t0, _c0, _s0, ka_lo, kb_lo = _load_qk_tile(Kh, cols, cmask & need_near, s_kt, COS, SIN, BLOCK_N, D, ROT,
                                                        BH, R_HALF, BT, INTERLEAVED, True, False, True, QKP, UPCAST)
    kfa, kfb, _t1, _c1, _s1, kfa_lo, kfb_lo = _load_qk_tile(Kh, cols, cmask & need_far, s_kt, FKC, FKS, BLOCK_N, D,
                                                            ROT, BH, R_HALF, BT, INTERLEAVED, True, False, True,
                                                            QKP, UPCAST)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if need_near:
        s = _scores(qa, qb_, qt, ka, kb, qt, BLOCK_M, BLOCK_N, True, False, PREC, UPCAST,
                    qa_lo, qb_lo, ka_lo, kb_lo, QKP)
    if need_far:
        sf = _scores(qfa, qfb, qt, kfa, kfb, qt, BLOCK_M, BLOCK_N, True, False, PREC, UPCAST,
                     qfa_lo, qfb_lo, kfa_lo, kfb_lo, QKP)
        s = tl.where(far, sf, s)
    _a, _b, kt, _c2, _s2, _al, _bl = _load_qk_tile(Kh, cols, cmask, s_kt, COS, SIN, BLOCK_N, D, ROT, BH, R_HALF, BT,
                                                   INTERLEAVED, False, HAS_TAIL, True, QKP, UPCAST)
    if HAS_TAIL:
        s += _dot(qt, tl.trans(kt), PREC, UPCAST)
    return s, far, need_near, need_far, ka, kb, kt, ka_lo, kb_lo, kfa, kfb, kfa_lo, kfb_lo


@triton.jit
def _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row, dcols, dmask,
              COS, SIN, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, s_kt, s_vt,
              D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
              INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              MASKED: tl.constexpr, qa_lo, qb_lo, QKP: tl.constexpr,
              qfa, qfb, qfa_lo, qfb_lo, FKC, FKS, pq, vq, POSF, VIS, MAP_WIN, MAP: tl.constexpr):
    """One key block of the online softmax; MASKED applies the element mask and bounds; MAP
    scores each pair near or far (the q far tile qf*, the k far table FKC/FKS)."""
    DT = Kh.dtype.element_ty
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    if MAP == 0:
        ka, kb, kt, _kc, _ks, ka_lo, kb_lo = _load_qk_tile(Kh, cols, cmask, s_kt, COS, SIN, BLOCK_N, D, ROT, BH,
                                                           R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED, QKP,
                                                           UPCAST)
        s = _scores(qa, qb_, qt, ka, kb, kt, BLOCK_M, BLOCK_N, ROPE, HAS_TAIL, PREC, UPCAST,
                    qa_lo, qb_lo, ka_lo, kb_lo, QKP)
    else:
        s = _map_scores(qa, qb_, qt, qfa, qfb, qfa_lo, qfb_lo, qa_lo, qb_lo, Kh, cols, cmask, rows < T, s_kt,
                        COS, SIN, FKC, FKS, pq, vq, POSF, VIS, MAP_WIN, D, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                        INTERLEAVED, HAS_TAIL, PREC, UPCAST, QKP, MAP)[0]
    s = s * qk_scale_log2
    v = _ld(Vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :], cmask, dmask, MASKED, D != BD)
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
def _q_side(Q, K, V, COS, SIN, KCOS, KSIN, FQC, FQS, FKC, FKS, POSF, VIS, h, hk, rows, rmask, QTD, KTD,
            s_qt, s_qh, s_kh, s_vh, s_tab, BLOCK_M: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
            BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr, INTERLEAVED: tl.constexpr,
            ROPE: tl.constexpr, HAS_TAIL: tl.constexpr, QKP: tl.constexpr, UPCAST: tl.constexpr,
            MAP: tl.constexpr):
    """A query tile's setup, shared by the forward and the dq kernel: head h's K/V bases, the
    k tables' rows (k head hk reads row hk // KTD; q head h row h // QTD), the q tile rotated near
    and, with a position map, far (q at its far positions; keys later by the far k table), and the
    map's query positions / visual flags (zeros without a map)."""
    Kh = K + hk.to(tl.int64) * s_kh
    Vh = V + hk.to(tl.int64) * s_vh
    QC = COS + (h // QTD).to(tl.int64) * s_tab
    QS = SIN + (h // QTD).to(tl.int64) * s_tab
    KC = KCOS + (hk // KTD).to(tl.int64) * s_tab
    KS = KSIN + (hk // KTD).to(tl.int64) * s_tab
    qa, qb_, qt, qcos, qsin, qa_lo, qb_lo = _load_qk_tile(Q + h.to(tl.int64) * s_qh, rows, rmask, s_qt, QC, QS,
                                                          BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE,
                                                          HAS_TAIL, True, QKP, UPCAST)
    FKCh = FKC + (hk // KTD).to(tl.int64) * s_tab
    FKSh = FKS + (hk // KTD).to(tl.int64) * s_tab
    if MAP != 0:
        qfa, qfb, _t, qfcos, qfsin, qfa_lo, qfb_lo = _load_qk_tile(
            Q + h.to(tl.int64) * s_qh, rows, rmask, s_qt, FQC + (h // QTD).to(tl.int64) * s_tab,
            FQS + (h // QTD).to(tl.int64) * s_tab, BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, False, True,
            QKP, UPCAST)
        pq, vq = _map_side(POSF, VIS, rows, rmask, MAP)
    else:
        qfa, qfb, qfa_lo, qfb_lo, qfcos, qfsin = qa, qb_, qa_lo, qb_lo, qcos, qsin
        pq = tl.zeros([BLOCK_M], dtype=tl.float32)
        vq = tl.zeros([BLOCK_M], dtype=tl.int32)
    return (Kh, Vh, KC, KS, FKCh, FKSh, qa, qb_, qt, qcos, qsin, qa_lo, qb_lo, qfa, qfb, qfcos, qfsin, qfa_lo,
            qfb_lo, pq, vq)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, KCOS, KSIN, DOC_START, ROW_START, Q_OFF, Q_NFULL, KV_IDX,
    T, NUM_ANCHORS, WINDOW, QTD, KTD, qk_scale_log2,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_tab,
    FQC, FQS, FKC, FKS, POSF, VIS, MAP_WIN,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    QKP: tl.constexpr, MAP: tl.constexpr,
):
    # last query blocks first: under a causal mask they visit the most key blocks
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    (Kh, Vh, KC, KS, FKCh, FKSh, qa, qb_, qt, _c, _s, qa_lo, qb_lo, qfa, qfb, _fc, _fs, qfa_lo, qfb_lo, pq,
     vq) = _q_side(Q, K, V, COS, SIN, KCOS, KSIN, FQC, FQS, FKC, FKS, POSF, VIS, h, hk, rows, rmask, QTD, KTD,
                   s_qt, s_qh, s_kh, s_vh, s_tab, BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE, HAS_TAIL,
                   QKP, UPCAST, MAP)
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
                                  dcols, dmask, KC, KS, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
                                  s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                                  INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, False,
                                  qa_lo, qb_lo, QKP, qfa, qfb, qfa_lo, qfb_lo, FKCh, FKSh, pq, vq, POSF, VIS,
                                  MAP_WIN, MAP)
        kbi = nxt
    kbi = tl.load(KV_IDX + mid, mask=mid < end, other=0)
    for e in range(mid, end):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < end, other=0)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row,
                                  dcols, dmask, KC, KS, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
                                  s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                                  INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True,
                                  qa_lo, qb_lo, QKP, qfa, qfb, qfa_lo, qfb_lo, FKCh, FKSh, pq, vq, POSF, VIS,
                                  MAP_WIN, MAP)
        kbi = nxt
    l_i = tl.where(rmask, l_i, 1.0)      # padding rows past T see no key
    out = acc / l_i[:, None]
    tl.store(O + h.to(tl.int64) * s_oh + rows[:, None].to(tl.int64) * s_ot + dcols[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + h.to(tl.int64) * T + rows, lse, mask=rmask)

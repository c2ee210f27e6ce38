"""Forward kernel of the flash-attention engine (see flash_attn.py for the formula)."""
from __future__ import annotations

import triton
import triton.language as tl

from posattn.kernels.triton.flash_attn_tiles import _LN2, _allowed, _dot, _ld, _load_qk_tile, _scores


@triton.jit
def _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row, dcols, dmask,
              COS, SIN, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2, s_kt, s_vt,
              D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
              INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              MASKED: tl.constexpr, qa_lo, qb_lo, QKP: tl.constexpr):
    """One key block of the online softmax; MASKED applies the element mask and bounds."""
    DT = Kh.dtype.element_ty
    cols = kbi * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    ka, kb, kt, _kc, _ks, ka_lo, kb_lo = _load_qk_tile(Kh, cols, cmask, s_kt, COS, SIN, BLOCK_N, D, ROT, BH, R_HALF,
                                                       BT, INTERLEAVED, ROPE, HAS_TAIL, MASKED, QKP, UPCAST)
    v = _ld(Vh + cols[:, None].to(tl.int64) * s_vt + dcols[None, :], cmask, dmask, MASKED, D != BD)
    s = _scores(qa, qb_, qt, ka, kb, kt, BLOCK_M, BLOCK_N, ROPE, HAS_TAIL, PREC, UPCAST,
                qa_lo, qb_lo, ka_lo, kb_lo, QKP) * qk_scale_log2
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
    Q, K, V, O, LSE, COS, SIN, KCOS, KSIN, DOC_START, ROW_START, Q_OFF, Q_NFULL, KV_IDX,
    T, NUM_ANCHORS, WINDOW, QTD, KTD, qk_scale_log2,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, s_tab,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT: tl.constexpr, BH: tl.constexpr, R_HALF: tl.constexpr, BT: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, HAS_TAIL: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    QKP: tl.constexpr,
):
    # last query blocks first: under a causal mask they visit the most key blocks
    qb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    Kh = K + hk.to(tl.int64) * s_kh
    Vh = V + hk.to(tl.int64) * s_vh
    # the tables' rows: q head h reads row h // QTD of the q table, k head hk row hk // KTD of the k table
    QC = COS + (h // QTD).to(tl.int64) * s_tab
    QS = SIN + (h // QTD).to(tl.int64) * s_tab
    KC = KCOS + (hk // KTD).to(tl.int64) * s_tab
    KS = KSIN + (hk // KTD).to(tl.int64) * s_tab
    qa, qb_, qt, _c, _s, qa_lo, qb_lo = _load_qk_tile(Q + h.to(tl.int64) * s_qh, rows, rmask, s_qt, QC, QS,
                                                      BLOCK_M, D, ROT, BH, R_HALF, BT, INTERLEAVED, ROPE,
                                                      HAS_TAIL, True, QKP, UPCAST)
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
                                  qa_lo, qb_lo, QKP)
        kbi = nxt
    kbi = tl.load(KV_IDX + mid, mask=mid < end, other=0)
    for e in range(mid, end):
        nxt = tl.load(KV_IDX + e + 1, mask=e + 1 < end, other=0)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, qa, qb_, qt, Kh, Vh, kbi, rows, q_doc, q_row,
                                  dcols, dmask, KC, KS, DOC_START, T, NUM_ANCHORS, WINDOW, qk_scale_log2,
                                  s_kt, s_vt, D, BD, BLOCK_M, BLOCK_N, ROT, BH, R_HALF, BT,
                                  INTERLEAVED, ROPE, HAS_TAIL, CAUSAL, HAS_WINDOW, PREC, UPCAST, True,
                                  qa_lo, qb_lo, QKP)
        kbi = nxt
    l_i = tl.where(rmask, l_i, 1.0)      # padding rows past T see no key
    out = acc / l_i[:, None]
    tl.store(O + h.to(tl.int64) * s_oh + rows[:, None].to(tl.int64) * s_ot + dcols[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + h.to(tl.int64) * T + rows, lse, mask=rmask)

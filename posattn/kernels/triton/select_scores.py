"""Token scores q . k over a (paged) KV cache (Triton): posattn.select.scores' GPU kernel.

Program (b, KV head, block of slots): the keys of BLOCK_S logical slots are read through the
block table once, optionally rotated by the per-call fp32 table (pre-RoPE caches: keys rotated
while scoring, exact angles from posattn/rope/table.py), and dotted with each of the GQA group's
G (already rotated) queries (kv_group arrives as G = 1: the op sums each group's queries). Soft vote:
that kernel writes per-head scores to a scratch, _vote_stats gives each (request, head) row its max
and 1 / sum of exp (online, one program per row), _vote_sum writes sum_h exp(s - m_h) / l_h per
block of slots. Contract: posattn/kernels/reference/select_scores.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(K, row, kv, d, partner, p, sign, inr, m2, valid, trow, s_tc):
    """rot(k) over the first R dims by the table rows trow ([BLOCK_S] pointers), k elsewhere."""
    kp = tl.load(K + row[:, None] + partner[None, :], mask=m2 & inr[None, :], other=0.0).to(tl.float32)
    tm = valid[:, None] & inr[None, :]
    c = tl.load(trow[:, None] + p[None, :], mask=tm, other=1.0)
    sn = tl.load(trow[:, None] + s_tc + p[None, :], mask=tm, other=0.0)
    return tl.where(inr[None, :], kv * c + sign[None, :] * kp * sn, kv)


@triton.jit
def _scores_fwd(Q, K, BT, CS, KT, OUT, QF, KTF, FAR, S_MAX, PS, HK, G, s_qb, s_qh, s_kb, s_kt, s_kh, s_bt, s_tc,
                s_tb, s_tt, s_ob, s_oh, scale, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                INTERLEAVED: tl.constexpr, ROPE: tl.constexpr, MAP: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HK
    hk = pid % HK
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    L = tl.minimum(tl.maximum(tl.load(CS + b), 0), S_MAX)
    valid = s < L
    page = tl.load(BT + b.to(tl.int64) * s_bt + s // PS, mask=valid, other=0).to(tl.int64)
    row = page * s_kb + (s % PS).to(tl.int64) * s_kt + hk.to(tl.int64) * s_kh            # [BLOCK_S]
    d = tl.arange(0, DP)
    dm = d < D
    m2 = valid[:, None] & dm[None, :]
    k = tl.load(K + row[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if ROPE:
        # rot(k)[d] = k[d] * cos[p] + sign * k[partner] * sin[p] for d < R; k[d] beyond
        if INTERLEAVED:
            p = d // 2
            partner = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        else:
            H2: tl.constexpr = R // 2
            p = tl.where(d < H2, d, d - H2)
            partner = tl.where(d < H2, d + H2, d - H2)
            sign = tl.where(d < H2, -1.0, 1.0)
        inr = d < R
        toff = b.to(tl.int64) * s_tb + s.to(tl.int64) * s_tt                                # [BLOCK_S]
        k0 = k
        k = _rotate(K, row, k0, d, partner, p, sign, inr, m2, valid, KT + toff, s_tc)
        if MAP:
            # a position map: the far pairs' keys at the far positions; both products per block
            kf = _rotate(K, row, k0, d, partner, p, sign, inr, m2, valid, KTF + toff, s_tc)
            far = tl.load(FAR + b.to(tl.int64) * S_MAX + s, mask=valid, other=0) != 0
    for g in range(G):
        h = hk * G + g
        qoff = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + d
        q = tl.load(Q + qoff, mask=dm, other=0.0).to(tl.float32)
        sc = tl.sum(k * q[None, :], axis=1) * scale
        if MAP:
            qf = tl.load(QF + qoff, mask=dm, other=0.0).to(tl.float32)
            sc = tl.where(far, tl.sum(kf * qf[None, :], axis=1) * scale, sc)
        sc = tl.where(valid, sc, -float("inf"))
        tl.store(OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + s, sc, mask=s < S_MAX)


@triton.jit
def _vote_stats(X, CS, M, IL, S_MAX, HQ, s_xb, s_xh, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HQ
    L = tl.minimum(tl.maximum(tl.load(CS + b), 0), S_MAX)
    row = X + b.to(tl.int64) * s_xb + (pid % HQ).to(tl.int64) * s_xh
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for s0 in range(0, L, BLOCK):
        x = tl.load(row + s0 + offs, mask=s0 + offs < L, other=-float("inf"))
        m_new = tl.maximum(m, x)
        # lanes still at -inf keep a zero sum (exp(-inf - -inf) would be NaN)
        acc = tl.where(m_new == -float("inf"), 0.0, acc * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    mx = tl.max(m, axis=0)
    tot = tl.sum(tl.where(m == -float("inf"), 0.0, acc * tl.exp(m - mx)), axis=0)
    tl.store(M + pid, mx)
    tl.store(IL + pid, tl.where(tot > 0, 1.0 / tot, 0.0))


@triton.jit
def _vote_sum(X, CS, M, IL, V, S_MAX, HQ, s_xb, s_xh, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    L = tl.minimum(tl.maximum(tl.load(CS + b), 0), S_MAX)
    valid = s < L
    acc = tl.zeros([BLOCK], tl.float32)
    row = X + b.to(tl.int64) * s_xb
    for h in range(HQ):
        x = tl.load(row + s, mask=valid, other=-float("inf"))
        row += s_xh
        mh = tl.load(M + b * HQ + h)
        acc += tl.where(valid, tl.exp(x - mh), 0.0) * tl.load(IL + b * HQ + h)
    tl.store(V + b.to(tl.int64) * S_MAX + s, tl.where(valid, acc, -float("inf")), mask=s < S_MAX)


def default_config(key) -> dict:
    return {"block_s": 64, "num_warps": 4}


def search_space(key) -> list[dict]:
    return [{"block_s": bs, "num_warps": w} for bs in (32, 64, 128) for w in (2, 4, 8)]


def scores(q, k_cache, block_table, cache_seqlens, scale, ktab, rotary_dim, interleaved, config,
           vote=False, far=None) -> torch.Tensor:
    """fp32 [B, Hq, S_max] ([B, 1, S_max] with vote); see posattn/kernels/reference/select_scores.py."""
    B, HQ, D = q.shape
    NB, PS, HK, _ = k_cache.shape
    S = block_table.shape[1] * PS
    out = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device)
    if B == 0 or S == 0 or HQ == 0:
        return out[:, :1] if vote else out
    bs = int(config.get("block_s", 64))
    if ktab is not None:
        s_tc, s_tb, s_tt = ktab.stride(0), (ktab.stride(1) if ktab.shape[1] > 1 else 0), ktab.stride(2)
        kt = ktab
    else:
        s_tc = s_tb = s_tt = 0
        kt = q
    if far is not None:        # q_far, ktab_far with q's and ktab's strides, far uint8 [B, S_max] contiguous
        qf, ktf, fm = far[0].to(q.dtype).contiguous(), far[1].contiguous(), far[2].contiguous()
        q, kt = q.contiguous(), kt.contiguous()
        assert qf.stride() == q.stride() and ktf.stride() == kt.stride() and fm.shape == (B, S)
        s_tc, s_tb, s_tt = kt.stride(0), (kt.stride(1) if kt.shape[1] > 1 else 0), kt.stride(2)
    else:
        qf, ktf, fm = q, kt, cache_seqlens
    _scores_fwd[(B * HK, triton.cdiv(S, bs))](
        q, k_cache, block_table, cache_seqlens, kt, out, qf, ktf, fm, S, PS, HK, HQ // HK, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), s_tc, s_tb, s_tt,
        out.stride(0), out.stride(1), float(scale), D=D, DP=triton.next_power_of_2(D), R=int(rotary_dim),
        INTERLEAVED=bool(interleaved), ROPE=ktab is not None, MAP=far is not None, BLOCK_S=bs,
        num_warps=int(config.get("num_warps", 4)))
    if not vote:
        return out
    m = torch.empty(B, HQ, dtype=torch.float32, device=q.device)
    il = torch.empty_like(m)
    res = torch.empty(B, 1, S, dtype=torch.float32, device=q.device)
    _vote_stats[(B * HQ,)](out, cache_seqlens, m, il, S, HQ, out.stride(0), out.stride(1), BLOCK=1024)
    _vote_sum[(B, triton.cdiv(S, 256))](out, cache_seqlens, m, il, res, S, HQ, out.stride(0), out.stride(1),
                                        BLOCK=256)
    return res

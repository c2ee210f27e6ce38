"""posattn.vq's Triton kernels: nearest-centroid assignment and centroid-lookup scores.

assign, program (block of tokens, KV head): the keys' rows [BLOCK_T, D] against blocks of
[BLOCK_C, D] metric centroids (one fp32 dot per block), a running (min, argmin) with ties to the
lower code. code_scores, two launches: the per-query-head table ``scale * qf . centroid`` [B, Hq, C]
(program: query head x block of codes), then, per (request, KV head, block of slots), one code
read per slot (through the block table) and a gather of the G heads' table rows: the far tokens
cost 2 bytes each, not a key row. Contract: posattn/kernels/reference/vq.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vq_assign(K, MC, CN, OUT, T, C, s_kt, s_kh, s_mh, s_mc, s_nh, s_ot,
               D: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, DP)
    k = tl.load(K + t.to(tl.int64)[:, None] * s_kt + h * s_kh + d[None, :],
                mask=(t < T)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_T], float("inf"), tl.float32)
    bidx = tl.zeros([BLOCK_T], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = tl.load(MC + h * s_mh + c.to(tl.int64)[:, None] * s_mc + d[None, :],
                     mask=(c < C)[:, None] & (d < D)[None, :], other=0.0)
        dots = tl.dot(k, tl.trans(mc), input_precision="ieee")                    # [BLOCK_T, BLOCK_C]
        cn = tl.load(CN + h * s_nh + c, mask=c < C, other=0.0)
        dist = tl.where((c < C)[None, :], cn[None, :] - 2.0 * dots, float("inf"))
        m = tl.min(dist, axis=1)
        i = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32) + c0
        upd = m < best                                  # strict: an earlier block keeps a tie
        best = tl.where(upd, m, best)
        bidx = tl.where(upd, i, bidx)
    tl.store(OUT + t.to(tl.int64) * s_ot + h, bidx.to(OUT.dtype.element_ty), mask=t < T)


@triton.jit
def _vq_table(QF, CENT, TAB, C, HQ, G, s_qb, s_qh, s_ch, s_cc, scale,
              D: tl.constexpr, DP: tl.constexpr, BLOCK_C: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, DP)
    q = tl.load(QF + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + d, mask=d < D, other=0.0).to(tl.float32)
    cent = tl.load(CENT + (h // G).to(tl.int64) * s_ch + c.to(tl.int64)[:, None] * s_cc + d[None, :],
                   mask=(c < C)[:, None] & (d < D)[None, :], other=0.0)
    tab = tl.sum(cent * q[None, :], axis=1) * scale
    tl.store(TAB + bh.to(tl.int64) * C + c, tab, mask=c < C)


@triton.jit
def _vq_gather(TAB, CODES, BT, FL, OUT, C, S, PS, HK, G, s_cb, s_ct, s_bt, s_ob, s_oh,
               BLOCK_S: tl.constexpr):
    pid0 = tl.program_id(0)
    b = pid0 // HK
    hk = pid0 % HK
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    L = tl.load(FL + b)
    valid = (s < S) & (s < L)
    page = tl.load(BT + b.to(tl.int64) * s_bt + s // PS, mask=valid, other=0).to(tl.int64)
    code = tl.load(CODES + page * s_cb + (s % PS).to(tl.int64) * s_ct + hk, mask=valid, other=0).to(tl.int32)
    code = tl.minimum(tl.maximum(code, 0), C - 1)
    for g in range(G):
        h = hk * G + g
        v = tl.load(TAB + (b * (HK * G) + h).to(tl.int64) * C + code, mask=valid, other=0.0)
        tl.store(OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + s, tl.where(valid, v, -float("inf")),
                 mask=s < S)


def default_config(key) -> dict:
    return {"block_c": 64, "block_s": 256, "num_warps": 4}


def search_space(key) -> list[dict]:
    return [{"block_c": bc, "block_s": bs, "num_warps": w} for bc in (32, 128) for bs in (128, 512, 1024)
            for w in (4, 8)]


def assign(keys, metric_centroids, centroid_norms, code_dtype, config=None) -> torch.Tensor:
    """codes [T, Hk]; see posattn/kernels/reference/vq.py."""
    config = config or {}
    T, HK, D = keys.shape
    C = metric_centroids.shape[1]
    out = torch.empty(T, HK, dtype=code_dtype, device=keys.device)
    if out.numel() == 0:
        return out
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    bt = int(config.get("block_t", 32))
    mc, cn = metric_centroids.contiguous(), centroid_norms.contiguous()
    _vq_assign[(triton.cdiv(T, bt), HK)](
        keys, mc, cn, out, T, C, keys.stride(0), keys.stride(1), mc.stride(0), mc.stride(1), cn.stride(0),
        out.stride(0), D=D, DP=max(16, triton.next_power_of_2(D)), BLOCK_T=bt,
        BLOCK_C=int(config.get("block_c", 32)), num_warps=int(config.get("num_warps", 4)))
    return out


def code_scores(qf, centroids, codes, block_table, far_len, scale, out, config) -> torch.Tensor:
    """Fills out fp32 [B, Hq, S_max]; see posattn/kernels/reference/vq.py."""
    B, HQ, D = qf.shape
    HK, C, _ = centroids.shape
    S = out.shape[2]
    if out.numel() == 0:
        return out
    G = HQ // HK
    qf = qf.to(torch.float32)
    cent = centroids.contiguous()
    tab = torch.empty(B, HQ, C, dtype=torch.float32, device=qf.device)
    bc, bs, w = int(config.get("block_c", 64)), int(config.get("block_s", 256)), int(config.get("num_warps", 4))
    _vq_table[(B * HQ, triton.cdiv(C, bc))](
        qf, cent, tab, C, HQ, G, qf.stride(0), qf.stride(1), cent.stride(0), cent.stride(1), float(scale),
        D=D, DP=triton.next_power_of_2(D), BLOCK_C=bc, num_warps=w)
    _vq_gather[(B * HK, triton.cdiv(S, bs))](
        tab, codes, block_table, far_len, out, C, S, codes.shape[1], HK, G, codes.stride(0), codes.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), BLOCK_S=bs, num_warps=w)
    return out


_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specializations(cases=None):
    """(name, fn, signature, constexprs, num_warps) of the three kernels, for ahead-of-time compiles
    (tests/vq/test_vq_aot.py). cases: (head_dim, keys dtype, code dtype)."""
    cases = cases or [(128, torch.bfloat16, torch.int16), (80, torch.float16, torch.int32),
                      (96, torch.float32, torch.int16)]
    out = []
    for D, dt, cdt in cases:
        DP = triton.next_power_of_2(D)
        ci = "*i16" if cdt == torch.int16 else "*i32"
        const = dict(D=D, DP=max(16, DP), BLOCK_T=32, BLOCK_C=32)
        types = dict(K=f"*{_TL[dt]}", MC="*fp32", CN="*fp32", OUT=ci, T="i32", C="i32")
        sig = {a: "constexpr" if a in const else types.get(a, "i64") for a in _vq_assign.arg_names}
        out.append((f"vq_assign_d{D}_{_TL[dt]}_{ci[2:]}", _vq_assign, sig, const, 4))
        const = dict(D=D, DP=DP, BLOCK_C=64)
        types = dict(QF="*fp32", CENT="*fp32", TAB="*fp32", C="i32", HQ="i32", G="i32", scale="fp32")
        sig = {a: "constexpr" if a in const else types.get(a, "i64") for a in _vq_table.arg_names}
        out.append((f"vq_table_d{D}", _vq_table, sig, const, 4))
        const = dict(BLOCK_S=256)
        types = dict(TAB="*fp32", CODES=ci, BT="*i32", FL="*i32", OUT="*fp32", C="i32", S="i32", PS="i32",
                     HK="i32", G="i32")
        sig = {a: "constexpr" if a in const else types.get(a, "i64") for a in _vq_gather.arg_names}
        out.append((f"vq_gather_{ci[2:]}", _vq_gather, sig, const, 4))
    return out

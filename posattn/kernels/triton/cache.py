"""Triton cache-write kernels: fused RoPE + paged append (rope_and_cache) and KV
compaction (kv_compact).

rope_and_cache, grid (T tokens, head blocks of q then of k). For the pair p of head h of
token t (row(h) = h // (H // ROWS)), exactly as the rotary kernel (rope.py):

    pos   = positions[pair_axis[p] or 0, t]; DPE: floor(pos / pair_pos_scale[p]) (+ q offset)
    theta = pos * inv_freq[row(h), p] reduced modulo 2*pi exactly in fp64 (rope.position_angle)
    q programs: qo[t, h] = rotate(q[t, h]);
    k programs (slot = slot_mapping[t] >= 0, page = slot // P, off = slot % P):
        k_cache[page, off, h] = rotate(k[t, h]) (ROTATE_K) or k[t, h];  v_cache[page, off, h] = v[t, h]

kv_compact, grid (B requests): request b moves the tokens at logical slots src[b, i]
(i < counts[b]) to cache_seqlens[b] + i, BLOCK_N tokens at a time; within a chunk every
source is loaded before a barrier and the stores come after it, so overlapping ranges are
safe (a source of a later chunk lies beyond every destination of this one, since sources
ascend from cache_seqlens[b]). The program then advances cache_seqlens[b]: one program per
request, so no other program can read the length after it changed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton.rope import position_angle
from posattn.kernels.triton.rope_common import TL_DTYPE, rotate_heads


@triton.jit
def _cos_sin(pos_ptr, pos_sa, t, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr, row, p, pmask, m,
             is_q, attention_scaling,
             HALF: tl.constexpr, PER_ROW: tl.constexpr, MULTI_AXIS: tl.constexpr, DPE: tl.constexpr,
             Q_OFFSET: tl.constexpr):
    """fp32 cos/sin of one token's pairs, [BLOCK_H, BLOCK_P] (PER_ROW) or [1, BLOCK_P]."""
    theta = position_angle(pos_ptr + t, pos_sa, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr, row, p,
                           pmask, m, is_q, HALF, PER_ROW, MULTI_AXIS, DPE, Q_OFFSET)
    cos = tl.cos(theta) * attention_scaling
    sin = tl.sin(theta) * attention_scaling
    if not PER_ROW:
        cos = cos[None, :]
        sin = sin[None, :]
    return cos, sin


@triton.jit
def _rope_cache_kernel(
    q_ptr, qo_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    pos_ptr, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr,
    HQ, HK, NQB, HPR_Q, HPR_K, PAGE,
    q_st, q_sh, qo_st, qo_sh, k_st, k_sh, v_st, v_sh,
    kc_sb, kc_sp, kc_sh, vc_sb, vc_sp, vc_sh, pos_sa,
    attention_scaling,
    HALF: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr, ROTATE_K: tl.constexpr,
    PER_ROW: tl.constexpr, MULTI_AXIS: tl.constexpr, DPE: tl.constexpr, Q_OFFSET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    if hb < NQB:
        h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        hmask = h < HQ
        row = h // HPR_Q
        cos, sin = _cos_sin(pos_ptr, pos_sa, t, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr, q_offset_ptr,
                            row, p, pmask, hmask[:, None] & pmask[None, :], True, attention_scaling,
                            HALF, PER_ROW, MULTI_AXIS, DPE, Q_OFFSET)
        rotate_heads(q_ptr + t * q_st + h[:, None] * q_sh, qo_ptr + t * qo_st + h[:, None] * qo_sh,
                     p, pmask, hmask, cos, sin, cos, sin, HALF, D, BLOCK_T, INTERLEAVED, COPY_TAIL)
    else:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            page = slot // PAGE
            off = slot - page * PAGE
            h = ((hb - NQB) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
            hmask = h < HK
            kdst = kc_ptr + page * kc_sb + off * kc_sp + h[:, None] * kc_sh
            ksrc = k_ptr + t * k_st + h[:, None] * k_sh
            if ROTATE_K:
                row = h // HPR_K
                cos, sin = _cos_sin(pos_ptr, pos_sa, t, inv_freq_ptr, pair_axis_ptr, pos_scale_ptr,
                                    q_offset_ptr, row, p, pmask, hmask[:, None] & pmask[None, :], False,
                                    attention_scaling, HALF, PER_ROW, MULTI_AXIS, DPE, Q_OFFSET)
                rotate_heads(ksrc, kdst, p, pmask, hmask, cos, sin, cos, sin, HALF, D, BLOCK_T,
                             INTERLEAVED, COPY_TAIL)
            else:
                dk = tl.arange(0, BLOCK_T)
                for d0 in range(0, D, BLOCK_T):
                    mk = hmask[:, None] & ((d0 + dk) < D)[None, :]
                    tl.store(kdst + d0 + dk[None, :], tl.load(ksrc + d0 + dk[None, :], mask=mk), mask=mk)
            dv = tl.arange(0, BLOCK_DV)
            mv = hmask[:, None] & (dv < DV)[None, :]
            vv = tl.load(v_ptr + t * v_st + h[:, None] * v_sh + dv[None, :], mask=mv)
            tl.store(vc_ptr + page * vc_sb + off * vc_sp + h[:, None] * vc_sh + dv[None, :], vv, mask=mv)


def default_config(head_dim: int, heads: int) -> dict:
    block_p = triton.next_power_of_2(max(head_dim // 2, 1))
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), max(1, 2048 // block_p)))
    return {"BLOCK_H": block_h, "num_warps": 4 if block_h * block_p >= 1024 else 2}


def search_space(key) -> list[dict]:
    """Candidate {BLOCK_H, num_warps}: no block taller than the heads, no tile past 8k pairs."""
    heads = max(int(key.heads_q), int(key.heads_k), 1)
    block_p = triton.next_power_of_2(max(int(key.rotary_dim) // 2, 1))
    out = []
    for bh in (1, 2, 4, 8, 16, 32):
        for w in (1, 2, 4, 8):
            if bh <= triton.next_power_of_2(heads) and bh * block_p <= 8192 and w * 32 <= max(32, bh * block_p):
                out.append({"BLOCK_H": bh, "num_warps": w})
    return out


def compact_search_space(key) -> list[dict]:
    """Candidate {BLOCK_N, num_warps} for kv_compact: chunks up to the source width, 1-8 warps."""
    width = max(1, int(key.width_bucket))
    return [{"BLOCK_N": n, "num_warps": w} for n in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)
            if n <= max(4, triton.next_power_of_2(width)) and n * int(key.head_dim) <= 16384]


def rope_cache_forward(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim: int,
                       interleaved: bool, rotate_k: bool, config: dict):
    """Same contract as posattn.kernels.reference.cache.rope_cache_forward."""
    T, HQ, HK = q.shape[1], q.shape[2], k.shape[2]
    D, DV = k.shape[3], v.shape[3]
    if T == 0:
        return
    block_h = int(config.get("BLOCK_H") or default_config(D, max(HQ, HK))["BLOCK_H"])
    nqb, nkb = triton.cdiv(HQ, block_h), triton.cdiv(HK, block_h)
    inv = tables.inv_freq
    rows = 1 if inv.dim() == 1 else inv.shape[0]
    half = rotary_dim // 2
    qq = q if HQ else k
    qqo = qo if HQ else k
    _rope_cache_kernel[(T, nqb + nkb)](
        qq, qqo, k, v, k_cache, v_cache, slots,
        pos3, inv, tables.pair_axis if tables.pair_axis is not None else inv,
        tables.pair_pos_scale if tables.pair_pos_scale is not None else inv,
        tables.pair_q_offset if tables.pair_q_offset is not None else inv,
        HQ, HK, nqb, max(HQ // rows, 1), max(HK // rows, 1), k_cache.shape[1],
        qq.stride(1), qq.stride(2), qqo.stride(1), qqo.stride(2), k.stride(1), k.stride(2),
        v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), pos3.stride(0),
        float(tables.attention_scaling),
        HALF=half, D=D, DV=DV, BLOCK_P=triton.next_power_of_2(max(half, 1)), BLOCK_H=block_h,
        BLOCK_T=triton.next_power_of_2(max(D - rotary_dim, 1)) if rotate_k else min(128, triton.next_power_of_2(D)),
        BLOCK_DV=triton.next_power_of_2(DV),
        INTERLEAVED=bool(interleaved), COPY_TAIL=rotary_dim < D, ROTATE_K=bool(rotate_k),
        PER_ROW=rows > 1, MULTI_AXIS=tables.pair_axis is not None, DPE=tables.pair_pos_scale is not None,
        Q_OFFSET=tables.pair_pos_scale is not None and tables.pair_q_offset is not None,
        num_warps=int(config.get("num_warps", 4)),
    )


@triton.jit
def _kv_compact_kernel(kc_ptr, vc_ptr, seqlens_ptr, src_ptr, counts_ptr, bt_ptr,
                       N, HK, PAGE,
                       kc_sb, kc_sp, kc_sh, vc_sb, vc_sp, vc_sh, src_sb, bt_sb,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PAGED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = tl.load(seqlens_ptr + b)
    n = tl.load(counts_ptr + b).to(tl.int32)
    i0 = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    for c in range(0, N, BLOCK_N):
        i = c + i0
        im = i < n
        s = tl.load(src_ptr + b * src_sb + i, mask=im, other=0).to(tl.int64)
        dst = (L + i).to(tl.int64)
        if PAGED:
            s_blk = tl.load(bt_ptr + b * bt_sb + s // PAGE, mask=im, other=0).to(tl.int64)
            d_blk = tl.load(bt_ptr + b * bt_sb + dst // PAGE, mask=im, other=0).to(tl.int64)
        else:
            s_blk = b + 0 * s
            d_blk = b + 0 * dst
        s_off = s % PAGE
        d_off = dst % PAGE
        for h in range(0, HK):
            mk = im[:, None] & (d < D)[None, :]
            mv = im[:, None] & (dv < DV)[None, :]
            ks = tl.load(kc_ptr + (s_blk * kc_sb + s_off * kc_sp + h * kc_sh)[:, None] + d[None, :], mask=mk)
            vs = tl.load(vc_ptr + (s_blk * vc_sb + s_off * vc_sp + h * vc_sh)[:, None] + dv[None, :], mask=mv)
            tl.debug_barrier()   # every source of this chunk is read before any destination is written
            tl.store(kc_ptr + (d_blk * kc_sb + d_off * kc_sp + h * kc_sh)[:, None] + d[None, :], ks, mask=mk)
            tl.store(vc_ptr + (d_blk * vc_sb + d_off * vc_sp + h * vc_sh)[:, None] + dv[None, :], vs, mask=mv)
            tl.debug_barrier()
    tl.store(seqlens_ptr + b, (L + n).to(seqlens_ptr.dtype.element_ty))


def kv_compact_forward(k_cache, v_cache, cache_seqlens, src, counts, block_table, config: dict):
    """Same contract as posattn.kernels.reference.cache.kv_compact_forward."""
    B, N = src.shape
    if B == 0:
        return
    D, DV = k_cache.shape[3], v_cache.shape[3]
    paged = block_table is not None
    bt = block_table if paged else cache_seqlens
    block_n = int(config.get("BLOCK_N") or min(16, triton.next_power_of_2(max(N, 1))))
    _kv_compact_kernel[(B,)](
        k_cache, v_cache, cache_seqlens, src, counts, bt,
        N, k_cache.shape[2], k_cache.shape[1],
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), src.stride(0),
        bt.stride(0) if paged else 0,
        D=D, DV=DV, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV),
        PAGED=paged, num_warps=int(config.get("num_warps", 4)),
    )


# ---------------------------------------------------------------------------
# ahead-of-time compilation (tests compile these for sm_90a without a GPU)

def _sig(fn, types: dict, const: dict) -> dict:
    return {a: ("constexpr" if a in const else types[a]) for a in fn.arg_names}


def aot_specializations(cases=None):
    """(name, fn, signature, constexprs, num_warps) of both kernels.

    cases: (head_dim, rotary_dim, dtype, heads_q, heads_k, variant) with variant in
    "plain", "mrope", "perhead", "dpe", "raw" (rotate_k=False)."""
    cases = cases or [(128, 128, torch.bfloat16, 32, 8, "plain"), (128, 128, torch.float16, 32, 8, "mrope"),
                      (80, 80, torch.float32, 3, 1, "perhead"), (96, 48, torch.bfloat16, 4, 2, "dpe"),
                      (256, 256, torch.bfloat16, 8, 8, "raw"), (64, 64, torch.float32, 4, 4, "plain")]
    out = []
    for D, R, dtype, HQ, HK, var in cases:
        ty = TL_DTYPE[dtype]
        cfg = default_config(D, max(HQ, HK))
        half = R // 2
        const = dict(HALF=half, D=D, DV=D, BLOCK_P=triton.next_power_of_2(half), BLOCK_H=cfg["BLOCK_H"],
                     BLOCK_T=(triton.next_power_of_2(max(D - R, 1)) if var != "raw"
                              else min(128, triton.next_power_of_2(D))),
                     BLOCK_DV=triton.next_power_of_2(D), INTERLEAVED=False, COPY_TAIL=R < D, ROTATE_K=var != "raw",
                     PER_ROW=var == "perhead", MULTI_AXIS=var in ("mrope", "dpe"), DPE=var == "dpe",
                     Q_OFFSET=var == "dpe")
        types = {n: f"*{ty}" for n in ("q_ptr", "qo_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr")}
        types.update(slot_ptr="*i64", pos_ptr="*i64", inv_freq_ptr="*fp32", pair_axis_ptr="*i32",
                     pos_scale_ptr="*fp32", q_offset_ptr="*fp32", attention_scaling="fp32")
        for n in _rope_cache_kernel.arg_names:
            types.setdefault(n, "i64" if n.endswith(("_st", "_sh", "_sb", "_sp", "_sa")) else "i32")
        out.append((f"rope_cache_{var}_d{D}_r{R}_{ty}", _rope_cache_kernel, _sig(_rope_cache_kernel, types, const),
                    const, cfg["num_warps"]))
        ctypes = {"kc_ptr": f"*{ty}", "vc_ptr": f"*{ty}", "seqlens_ptr": "*i32", "src_ptr": "*i64",
                  "counts_ptr": "*i32", "bt_ptr": "*i32"}
        for n in _kv_compact_kernel.arg_names:
            ctypes.setdefault(n, "i64" if n.endswith(("_sb", "_sp", "_sh")) else "i32")
        cconst = dict(D=D, DV=D, BLOCK_N=16, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(D),
                      PAGED=var != "raw")
        out.append((f"kv_compact_d{D}_{ty}_paged{int(var != 'raw')}", _kv_compact_kernel,
                     _sig(_kv_compact_kernel, ctypes, cconst), cconst, 4))
    return out

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
halves (pairs (p, p + R/2) or (2p, 2p + 1)) plus the untouched tail, and
rotated in registers by the call's fp32 cos/sin table [T, R/2]
(posattn.rope.table, built once per call by the rotary kernel's own exact
angle reduction, attention_scaling folded in); the scores are the sum of three
dots. The backward rotates dq and dk back by -theta with the same table.
Inputs are converted to fp32 at load and rotated in fp32. qk_precision says
how the rotated halves are multiplied (16-bit inputs): "bf16" rounds them to
the input dtype before the dots (exactly what apply_rope then attention
computes); "bf16x3" splits each into bf16 hi = bf16(r) and lo = bf16(r - hi)
and sums hi.hi + hi.lo + lo.hi (fp32 accumulation; 2^-16 relative instead of
2^-8, so that a score no longer depends on the absolute position through the
rounding); "fp32" multiplies in fp32. The backward recomputes the scores the
same way (p = exp2(s - lse) must see the forward's s), and its dS.k and
dS^T.q products use the split too (dS.hi + dS.lo, bf16 inputs): dS is
position-invariant once s is, a rotated k rounded once to bf16 is not, and
with one product the gradients would lose the relative property (see
_grad_dot, docs/numerics.md). dP = dO.V^T and dV = P^T.dO involve no rotation
and stay single bf16 products. Outputs are rounded once at the store.

With a relative-position map (posattn.position_maps; MAP = its code) each pair is scored with
q and k rotated near (the call's table) or far (the far q / far k tables, built per call at the
map's far positions by the same exact-angle routine: table [3, 2, rows, T, R/2]). Per key tile
the kernels test every pair (fp64 positions: p_i - p_j >= window; VistaRoPE: the visual flags)
and compute the near product only if some pair is near, the far one only if some pair is far
(the tables' loads are masked off otherwise), so only tiles that straddle the window pay two
products. The backward keeps two dq (dk) accumulators, near and far, each rotated back by its
own rotation at the store.

Files: flash_attn_tiles.py (loads, mask, products, launch configs),
flash_attn_fwd.py, flash_attn_bwd.py (kernels), flash_attn_aot.py (ahead-of-time
signatures); this file launches them.
"""
from __future__ import annotations

import torch
import triton

from posattn.kernels.triton.flash_attn_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from posattn.kernels.triton.flash_attn_fwd import _attn_fwd_kernel
from posattn.kernels.triton.flash_attn_tiles import (LN2, LOG2E, SMEM_HOPPER, SMEM_LARGE, _pow2,  # noqa: F401
                                                     default_config, interpreting, tile_meta)

__all__ = ["attn_forward", "attn_backward", "default_config", "tile_meta", "aot_specializations"]


def _rope_args(q, k, rope):
    """(q cos, q sin, k cos, k sin, q rows divisor, k rows divisor, row stride, rotary_dim,
    interleaved, qk_precision) from rope's table fp32 [n, 2, rows, T, R/2] (n = 2: DPE's query
    offset gives q its own table; rows: per-head frequency rows, head h of H reading row
    h // (H // rows)). q itself stands in for the tables (never read) without rope, so that no
    allocation happens."""
    if rope is None:
        return q, q, q, q, q.shape[1], k.shape[1], 0, 0, False, "bf16"
    table, rot, inter = rope[:3]
    if table.dim() == 3:                      # [2, T, R/2]: one table, one row
        table = table[None, :, None]
    rows = table.shape[2]
    kn = 0 if _map(rope) is not None else -1       # with a map, entries 1 and 2 are the far tables
    return (table[0, 0], table[0, 1], table[kn, 0], table[kn, 1], q.shape[1] // rows, k.shape[1] // rows,
            table.stride(2), rot, inter, (rope[3] if len(rope) > 3 else "bf16"))


def _map(rope):
    """(position map, positions [T]) of the kernel rope tuple, or None."""
    return rope[4] if rope is not None and len(rope) > 4 else None


def _map_args(q, rope):
    """(FQC, FQS, FKC, FKS, POSF, VIS, MAP_WIN) kernel arguments and the map's code: the far
    tables of q and k (entries 1, 2 of the [3, 2, rows, T, R/2] table), the positions in fp64
    (the far test p_i - p_j >= window in fp64, as posattn.position_maps computes it) and
    VistaRoPE's visual flags as int8. Without a map q stands in for each pointer (never read)."""
    from posattn.position_maps import VistaRoPE

    pm = _map(rope)
    if pm is None:
        return (q, q, q, q, q, q, 0), 0
    m, positions = pm
    table = rope[0]
    posf = positions.to(torch.float64).contiguous()
    vis = m.visual.to(torch.int8).contiguous() if isinstance(m, VistaRoPE) else posf
    return (table[1, 0], table[1, 1], table[2, 0], table[2, 1], posf, vis, int(m.window_or_zero)), int(m.code)


def attn_forward(q, k, v, lists, num_anchors: int, causal: bool, window: int | None, softmax_scale: float,
                 rope, config: dict):
    """q: [T, Hq, D]; k, v: [T, Hk, D] (last dim contiguous); lists: BlockLists for
    (BLOCK_M, BLOCK_N); rope: None or (table fp32 [n, 2, rows, T, R/2] from
    posattn.rope.table.attention_tables with backend 'triton' (or [2, T, R/2]), rotary_dim R,
    interleaved, qk_precision "bf16" | "bf16x3" | "fp32").
    Returns out [T, Hq, D] (q's dtype) and lse fp32 [Hq, T]."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(HQ, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cos, sin, kcos, ksin, qtd, ktd, s_tab, rot, inter, qkp = _rope_args(q, k, rope)
    margs, code = _map_args(q, rope)
    bm, bn = lists.block_m, lists.block_n
    grid = (triton.cdiv(T, bm), HQ)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cos, sin, kcos, ksin, lists.doc_start, lists.row_start,
        lists.q_offsets, lists.q_nfull, lists.q_kv_idx,
        T, num_anchors, window or 0, qtd, ktd, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), s_tab, *margs,
        GROUP=HQ // HK, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=window is not None,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        **tile_meta(D, rot, inter, q.dtype, qkp, code),
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
    block_t = 16 if interpreting() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(T, block_t), HQ)](
        out, dout, delta, T, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        D=D, BD=_pow2(D), BLOCK_T=block_t, num_warps=4)
    if dlse is not None:
        delta -= dlse.float()
    cos, sin, kcos, ksin, qtd, ktd, s_tab, rot, inter, qkp = _rope_args(q, k, rope)
    margs, code = _map_args(q, rope)
    bm, bn = lists.block_m, lists.block_n
    meta = tile_meta(D, rot, inter, q.dtype, qkp, code)
    common = dict(GROUP=HQ // HK, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=window is not None,
                  num_warps=config.get("bwd_num_warps", 4), num_stages=config.get("bwd_num_stages", 2), **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), HQ)](
        q, k, v, dout, dq, lse, delta, cos, sin, kcos, ksin, lists.doc_start, lists.row_start,
        lists.q_offsets, lists.q_nfull, lists.q_kv_idx,
        T, num_anchors, window or 0, qtd, ktd, softmax_scale * LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), s_tab, *margs, **common,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), HK)](
        q, k, v, dout, dk, dv, lse, delta, cos, sin, kcos, ksin, lists.doc_start, lists.row_start,
        lists.k_offsets, lists.k_nfull, lists.k_q_idx,
        T, num_anchors, window or 0, qtd, ktd, softmax_scale * LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), s_tab,
        *margs, **common,
    )
    return dq, dk, dv


def aot_specializations(cases=None):
    """See flash_attn_aot.aot_specializations."""
    from posattn.kernels.triton.flash_attn_aot import aot_specializations as spec

    return spec(cases)

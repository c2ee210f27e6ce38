"""Anchor attention on posattn._C (C++ / OpenMP): a blocked online-softmax forward and a
FlashAttention-2 backward over the same block visit lists as the Triton engine.

The kernel computes in fp32: q, k, v (and dout) are handed over as contiguous fp32 copies,
and the outputs are rounded to the input dtype once, here. With rotary embedding it reads the
call's cos/sin table (posattn.rope.table, backend "cpu": the C++ rotary kernel's own values)
and, with qk_precision "bf16", rounds the rotated q and k to the input dtype, as apply_rope's
output is; with "bf16x3" and "fp32" it keeps them in fp32 (fp32 products are at least as
accurate as the split bf16 ones: the same bound holds).

With a relative-position map (rope's fifth entry: (map, positions)) the table holds three
entries (near, far q, far k); the kernel rotates q and k both ways once and scores each pair
with the pair of rotations the map gives it (attention_cpu.h pair_is_far), and rotates the far
pairs' gradients back by the far rotation.
"""
from __future__ import annotations

import torch

from posattn.kernels import cpu as _cpu


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _map(rope):
    """(position map, positions) of the kernel rope tuple, or None."""
    return rope[4] if rope is not None and len(rope) > 4 else None


def _map_args(rope, keep):
    """(map_code, map_window, map_ptrs) for the C++ kernel (attention_cpu.h attn_set_map): the far
    tables (entries 1, 2 of the [3, 2, rows, T, R/2] table), positions in fp64, visual as uint8."""
    from posattn.position_maps import VistaRoPE

    m, positions = _map(rope)
    table = keep[0]
    pos = positions.to(torch.float64).contiguous()
    vis = m.visual.to(torch.uint8).contiguous() if isinstance(m, VistaRoPE) else None
    keep += [pos] + ([vis] if vis is not None else [])
    ptrs = [table[1, 0].data_ptr(), table[1, 1].data_ptr(), table[2, 0].data_ptr(), table[2, 1].data_ptr(),
            pos.data_ptr(), vis.data_ptr() if vis is not None else 0]
    return int(m.code), float(m.window_or_zero), ptrs


def _ptrs(q, k, v, lists, rope):
    cos = sin = kcos = ksin = 0
    keep = []
    if rope is not None:
        table = rope[0].to(torch.float32).contiguous()     # [n, 2, rows, T, R/2] (or [2, T, R/2])
        if table.dim() == 3:
            table = table[None, :, None]
        keep.append(table)
        # near k: DPE's entry 1 (n = 2), else entry 0 (with a map, entries 1 and 2 are the far tables)
        kn = 0 if _map(rope) is not None else -1
        cos, sin = table[0, 0].data_ptr(), table[0, 1].data_ptr()
        kcos, ksin = table[kn, 0].data_ptr(), table[kn, 1].data_ptr()
    kq = lists.k_offsets
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), lists.doc_start.data_ptr(), lists.row_start.data_ptr(),
            lists.q_offsets.data_ptr(), lists.q_kv_idx.data_ptr(), lists.q_kv_masked.data_ptr(),
            kq.data_ptr() if kq is not None else 0,
            lists.k_q_idx.data_ptr() if kq is not None else 0,
            lists.k_q_masked.data_ptr() if kq is not None else 0, cos, sin, kcos, ksin]
    return ptrs, keep


def _rows(rope) -> int:
    """Per-head frequency rows of the rope table (1 when shared)."""
    return 1 if rope is None or rope[0].dim() == 3 else int(rope[0].shape[2])


def _scalars(q, k, lists, num_anchors, causal, window, softmax_scale, rope):
    T, HQ, D = q.shape
    rot, inter = (rope[1], rope[2]) if rope is not None else (0, False)
    qkp = rope[3] if rope is not None and len(rope) > 3 else "bf16"
    return (T, HQ, k.shape[1], D), (float(softmax_scale), int(num_anchors), bool(causal),
                                    int(window) if window is not None else 0, lists.block_m, lists.block_n,
                                    int(rot), bool(inter), _ROUND[q.dtype] if qkp == "bf16" else 0)


def attn_forward(q, k, v, lists, num_anchors, causal, window, softmax_scale, rope, config):
    """Same contract as posattn.kernels.triton.flash_attn.attn_forward (rope: None or
    (table fp32 [n, 2, rows, T, R/2] from posattn.rope.table.attention_tables with backend "cpu",
    rotary_dim, interleaved, qk_precision))."""
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    T, HQ, _ = q.shape
    out = torch.empty(qf.shape, dtype=torch.float32)
    lse = torch.empty(HQ, T, dtype=torch.float32)
    if T:
        dims, sc = _scalars(q, k, lists, num_anchors, causal, window, softmax_scale, rope)
        ptrs, keep = _ptrs(qf, kf, vf, lists, rope)
        tail = (out.data_ptr(), lse.data_ptr(), int(config.get("threads", 0)), _rows(rope))
        if _map(rope) is not None:
            _cpu._C.attention_forward_map(*dims, ptrs, *sc, *tail, *_map_args(rope, keep))
        else:
            _cpu._C.attention_forward(*dims, ptrs, *sc, *tail)
    return torch.empty_like(q).copy_(out), lse


def attn_backward(dout, q, k, v, out, lse, lists, num_anchors, causal, window, softmax_scale, rope, config,
                  dlse=None):
    """Same contract as posattn.kernels.triton.flash_attn.attn_backward (lists with the transpose)."""
    qf, kf, vf, dof = _f32(q), _f32(k), _f32(v), _f32(dout)
    delta = (out.float() * dof).sum(-1).transpose(0, 1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq, dk, dv = (torch.empty(x.shape, dtype=torch.float32) for x in (qf, kf, vf))
    if q.shape[0]:
        dims, sc = _scalars(q, k, lists, num_anchors, causal, window, softmax_scale, rope)
        ptrs, keep = _ptrs(qf, kf, vf, lists, rope)
        tail = (dof.data_ptr(), delta.data_ptr(), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                int(config.get("threads", 0)), _rows(rope))
        if _map(rope) is not None:
            _cpu._C.attention_backward_map(*dims, ptrs, *sc, *tail, *_map_args(rope, keep))
        else:
            _cpu._C.attention_backward(*dims, ptrs, *sc, *tail)
    return torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


def _rect_args(q, k, lists, q_index, k_index, num_anchors, causal, window, softmax_scale):
    T, HQ, D = q.shape
    return (T, HQ, k.shape[1], D), (float(softmax_scale), int(num_anchors), bool(causal),
                                    int(window) if window is not None else 0, lists.block_m, lists.block_n)


def _rect_ptrs(q, k, v, lists):
    kq = lists.k_offsets
    return [q.data_ptr(), k.data_ptr(), v.data_ptr(), lists.doc_start.data_ptr(), lists.row_start.data_ptr(),
            lists.q_offsets.data_ptr(), lists.q_kv_idx.data_ptr(), lists.q_kv_masked.data_ptr(),
            kq.data_ptr() if kq is not None else 0, lists.k_q_idx.data_ptr() if kq is not None else 0,
            lists.k_q_masked.data_ptr() if kq is not None else 0, 0, 0]


def rect_forward(q, k, v, lists, q_index, k_index, num_anchors, causal, window, softmax_scale,
                 hide_anchor_keys, threads=0):
    """Anchor attention of Tq queries at the step's global tokens ``q_index`` against Tk keys at
    ``k_index`` (int32 [Tq] / [Tk], ascending), over ``lists`` from masks.lower_rect (whose
    doc_start / row_start cover the whole step). q: [Tq, Hq, D]; k, v: [Tk, Hk, D], already rotated.

    Returns (out fp32 [Tq, Hq, D], lse fp32 [Hq, Tq]); a query that sees no key gets 0 and -inf.
    """
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    Tq, HQ, _ = q.shape
    out = torch.zeros(qf.shape, dtype=torch.float32)
    lse = torch.full((HQ, Tq), float("-inf"), dtype=torch.float32)
    if Tq and k.shape[0] and lists.nnz:
        qi, ki = q_index.to(torch.int32).contiguous(), k_index.to(torch.int32).contiguous()
        dims, sc = _rect_args(q, k, lists, qi, ki, num_anchors, causal, window, softmax_scale)
        _cpu._C.attention_forward_rect(*dims, _rect_ptrs(qf, kf, vf, lists), *sc, out.data_ptr(), lse.data_ptr(),
                                       int(threads), k.shape[0], qi.data_ptr(), ki.data_ptr(), bool(hide_anchor_keys))
    return out, lse


def rect_backward(dout, q, k, v, lse, delta, lists, q_index, k_index, num_anchors, causal, window, softmax_scale,
                  hide_anchor_keys, threads=0):
    """The rectangle's share of the gradients given the *merged* lse [Hq, Tq] and
    delta = rowsum(dout * out) - dlse [Hq, Tq] of the queries (lists with the transpose).
    Returns fp32 (dq [Tq, Hq, D], dk [Tk, Hk, D], dv [Tk, Hk, D])."""
    qf, kf, vf, dof = _f32(q), _f32(k), _f32(v), _f32(dout)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32) for x in (qf, kf, vf))
    if q.shape[0] and k.shape[0] and lists.nnz:
        qi, ki = q_index.to(torch.int32).contiguous(), k_index.to(torch.int32).contiguous()
        dims, sc = _rect_args(q, k, lists, qi, ki, num_anchors, causal, window, softmax_scale)
        _cpu._C.attention_backward_rect(*dims, _rect_ptrs(qf, kf, vf, lists), *sc, dof.data_ptr(), delta.data_ptr(),
                                        lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), int(threads),
                                        k.shape[0], qi.data_ptr(), ki.data_ptr(), bool(hide_anchor_keys))
    return dq, dk, dv

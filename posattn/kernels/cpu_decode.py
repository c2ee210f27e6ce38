"""Decode attention on posattn._C (C++ / OpenMP): the decode engine's CPU backend.

The kernel reads q and the caches in their own dtype (fp32, fp16 or bf16; each K/V row is
widened to fp32 once per GQA group) through the block table, computes in fp32, and rounds
the output once at the store. Contract: posattn/kernels/reference/decode.py.
"""
from __future__ import annotations

import torch

from posattn.kernels import cpu as _cpu

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _rot_args(rot):
    """(ints, pointers, tensors to keep alive) of decode_forward_rot; see csrc/cpu/decode_cpu.h."""
    qn = rot.qn.to(torch.float32)
    qf = rot.qf.to(torch.float32) if rot.qf is not None else None
    kt, ktf = rot.ktab, rot.ktab_far
    qp = rot.qpos.to(torch.float64).contiguous() if rot.qpos is not None else None
    kp = rot.kpos.to(torch.float64).contiguous() if rot.kpos is not None else None
    vis = rot.visual.contiguous() if rot.visual is not None else None
    if qf is not None and qf.stride() != qn.stride():
        qf = qf.contiguous()
        qn = qn.contiguous()
    s_tc = s_tb = s_tt = 0
    if kt is not None:
        kt = kt.contiguous()
        ktf = ktf.contiguous() if ktf is not None else None
        s_tc, s_tb, s_tt = rot.strides(kt)
    ints = [qn.stride(0), qn.stride(1), s_tc, s_tb, s_tt, rot.rotary_dim, int(rot.interleaved), int(rot.map_code),
            int(rot.window), kp.stride(0) if kp is not None and kp.shape[0] > 1 else 0,
            vis.stride(0) if vis is not None else 0, *rot.strides(ktf)]
    keep = [qn, qf, kt, ktf, qp, kp, vis]
    return ints, [x.data_ptr() if x is not None else 0 for x in keep], keep


def decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                   softmax_scale, num_splits, max_q, config, kv_indices=None, rot=None):
    """(out [T, Hq, D] in q's dtype, lse fp32 [T, Hq]); see the module docstring. ``rot``:
    posattn/decode/rotary.py's DecodeRotary (fp32 products in every qk_precision mode) or None."""
    T, HQ, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(T, HQ, dtype=torch.float32)
    if T == 0:
        return out, lse
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    cs, cu = cache_seqlens.contiguous(), cu_seqlens_q.contiguous()
    tm = None
    if tree_mask is not None:
        tm = tree_mask if tree_mask.stride(-1) == 1 else tree_mask.contiguous()
    idx = kv_indices if kv_indices is None or kv_indices.stride(-1) == 1 else kv_indices.contiguous()
    dims = [T, cs.shape[0], HQ, k_cache.shape[2], D, k_cache.shape[1], bt.shape[1],
            idx.shape[2] if idx is not None else 0, idx.shape[1] if idx is not None else 0]
    ptrs = [q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), cs.data_ptr(), cu.data_ptr(),
            tm.data_ptr() if tm is not None else 0, out.data_ptr(), lse.data_ptr(),
            idx.data_ptr() if idx is not None else 0]
    strides = [q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0),
               tm.stride(0) if tm is not None else 0, out.stride(0), out.stride(1),
               idx.stride(0) if idx is not None else 0, idx.stride(1) if idx is not None else 0]
    args = (dims, ptrs, strides, bool(causal), int(window), float(softmax_scale), _CODES[q.dtype],
            int(num_splits or config.get("num_splits", 0) or 0), int(config.get("block_n", 64)), _cpu._threads(config))
    if rot is None:
        _cpu._C.decode_forward(*args)
    else:
        ints, rptrs, keep = _rot_args(rot)
        _cpu._C.decode_forward_rot(*args, ints, rptrs)
        del keep
    return out, lse

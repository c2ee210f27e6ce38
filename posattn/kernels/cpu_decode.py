"""Decode attention on posattn._C (C++ / OpenMP): the decode engine's CPU backend.

The kernel reads q and the caches in their own dtype (fp32, fp16 or bf16; each K/V row is
widened to fp32 once per GQA group) through the block table, computes in fp32, and rounds
the output once at the store. Contract: posattn/kernels/reference/decode.py.
"""
from __future__ import annotations

import torch

from posattn.kernels import cpu as _cpu

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                   softmax_scale, num_splits, max_q, config, kv_indices=None):
    """(out [T, Hq, D] in q's dtype, lse fp32 [T, Hq]); see the module docstring."""
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
    _cpu._C.decode_forward(dims, ptrs, strides, bool(causal), int(window), float(softmax_scale), _CODES[q.dtype],
                           int(num_splits or config.get("num_splits", 0) or 0), int(config.get("block_n", 64)),
                           _cpu._threads(config))
    return out, lse

"""Thin wrappers over posattn._C's cache-write kernels (csrc/cpu/cache_cpu.cpp).

Same contracts as posattn.kernels.reference.cache (rope_cache_forward, kv_compact_forward).
"""
from __future__ import annotations

import torch

from posattn.kernels import cpu as cpu_kernels
from posattn.kernels import native


def _threads(config: dict) -> int:
    n = int(config.get("threads", 0))
    return n if n > 0 else torch.get_num_threads()


def cache_args(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim: int, interleaved: bool,
               rotate_k: bool) -> tuple:
    """The integer lists of rope_cache_forward (csrc/cache_args.h reads them): q, k, dims, pos,
    freqs, attention_scaling, cache."""
    T, D = k.shape[1], k.shape[3]
    # k's "out" is never written by the kernels (k goes to the cache): pass k itself
    cache = [int(rotate_k), v.data_ptr(), v.stride(1), v.stride(2), v.shape[3],
             k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
             v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
             slots.data_ptr(), k_cache.shape[1]]
    return (native.rope_tensor_args(q, qo), native.rope_tensor_args(k, k),
            [1, T, D, rotary_dim, int(interleaved), int(rotary_dim < D)],
            native.pos_args(pos3), native.freq_args(tables), float(tables.attention_scaling), cache)


def compact_args(k_cache, v_cache, cache_seqlens, src, counts, block_table) -> list:
    """kv_compact's 21 integers (csrc/cache_args.h): byte strides; src and counts int64, block_table int32."""
    B, N = src.shape
    ke, ve = k_cache.element_size(), v_cache.element_size()
    bt = block_table
    return [k_cache.data_ptr(), k_cache.stride(0) * ke, k_cache.stride(1) * ke, k_cache.stride(2) * ke,
            v_cache.data_ptr(), v_cache.stride(0) * ve, v_cache.stride(1) * ve, v_cache.stride(2) * ve,
            k_cache.shape[3] * ke, v_cache.shape[3] * ve, k_cache.shape[2], k_cache.shape[1], B, N,
            cache_seqlens.data_ptr(), int(cache_seqlens.dtype == torch.int64),
            src.data_ptr(), src.stride(0), counts.data_ptr(),
            0 if bt is None else bt.data_ptr(), 0 if bt is None else bt.stride(0)]


def rope_cache_forward(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim: int,
                       interleaved: bool, rotate_k: bool, config: dict):
    if k.shape[1] == 0:
        return
    cpu_kernels._C.rope_cache_forward(*cache_args(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim,
                                                  interleaved, rotate_k),
                                      native.DTYPE_CODE[k.dtype], _threads(config))


def kv_compact_forward(k_cache, v_cache, cache_seqlens, src, counts, block_table, config: dict):
    """src and counts arrive as int64 (the op converts them), block_table as int32."""
    if src.shape[0] == 0:
        return
    cpu_kernels._C.kv_compact_forward(compact_args(k_cache, v_cache, cache_seqlens, src, counts, block_table),
                                      _threads(config))

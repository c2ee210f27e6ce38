"""Thin wrappers over posattn._cuda's cache-write kernels (csrc/cuda/cache_cuda.cu), on the
current torch stream. Same contracts as posattn.kernels.reference.cache.

Not verified on a GPU: posattn/decode registers them as the "cuda" backend used only when
asked for by name.
"""
from __future__ import annotations

import torch

from posattn.kernels import cuda as cuda_kernels
from posattn.kernels import native
from posattn.kernels.cpu_cache import cache_args, compact_args


def _stream(x):
    return torch.cuda.current_stream(x.device).cuda_stream


def rope_cache_forward(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim: int,
                       interleaved: bool, rotate_k: bool, config: dict):
    if k.shape[1] == 0:
        return
    with torch.cuda.device(k.device):
        cuda_kernels.module().rope_cache_forward(
            *cache_args(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim, interleaved, rotate_k),
            native.DTYPE_CODE[k.dtype], int(config.get("threads", 128)), _stream(k))


def kv_compact_forward(k_cache, v_cache, cache_seqlens, src, counts, block_table, config: dict):
    """src and counts as int64 (converted here), block_table int32."""
    if src.shape[0] == 0:
        return
    src, counts = src.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous()
    with torch.cuda.device(k_cache.device):
        cuda_kernels.module().kv_compact_forward(compact_args(k_cache, v_cache, cache_seqlens, src, counts,
                                                              block_table), int(config.get("threads", 128)),
                                                 _stream(k_cache))

"""Reference cache writes in fp64, written for clarity (the oracle of every backend).

rope_cache_forward: for token t of T new tokens (q: [1, T, Hq, D], k: [1, T, Hk, D],
v: [1, T, Hk, Dv]) with slot = slot_mapping[t] >= 0:

    qo[t]                                   = rope(q[t], positions[:, t])   (query angles)
    k_cache[slot // page, slot % page]      = rope(k[t], positions[:, t])   (or k[t] when not rotate_k)
    v_cache[slot // page, slot % page]      = v[t]

with rope as in posattn.kernels.reference.rope (exact angle reduction, rounded once
at the store); slot = -1 writes nothing for that token.

kv_compact_forward: for request b with L = cache_seqlens[b] and n = counts[b], the
token at logical slot src[b, i] moves to logical slot L + i (i < n), all sources read
before any write; then cache_seqlens[b] = L + n. Logical slot l of request b is
physical (block_table[b, l // page], l % page), or (b, l) without a block table.
"""
from __future__ import annotations

import torch

from posattn.kernels.reference.rope import rope_angles, rotate


def rope_cache_forward(q, qo, k, v, k_cache, v_cache, slots, pos3, tables, rotary_dim: int,
                       interleaved: bool, rotate_k: bool, config: dict):
    """q, qo: [1, T, Hq, D]; k: [1, T, Hk, D]; v: [1, T, Hk, Dv]; k_cache/v_cache:
    [num_blocks, page, Hk, D / Dv] views (any strides); slots: int64 [T]; pos3: [A, 1, T]."""
    scale = float(tables.attention_scaling)
    if q.shape[2]:
        qo.copy_(rotate(q, rope_angles(pos3, tables, True), rotary_dim, interleaved, scale))
    kr = rotate(k, rope_angles(pos3, tables, False), rotary_dim, interleaved, scale) if rotate_k else k
    page = k_cache.shape[1]
    for t in range(slots.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        k_cache[s // page, s % page] = kr[0, t].to(k_cache.dtype)
        v_cache[s // page, s % page] = v[0, t]


def kv_compact_forward(k_cache, v_cache, cache_seqlens, src, counts, block_table, config: dict):
    """k_cache/v_cache: [num_blocks, page, Hk, D] (or [B, S_cap, Hk, D] with block_table None);
    cache_seqlens: int32 [B] (advanced in place); src: int [B, N]; counts: int [B]."""
    page = k_cache.shape[1]

    def where(b, l):
        if block_table is None:
            return b, l
        return int(block_table[b, l // page]), l % page

    for b in range(src.shape[0]):
        L, n = int(cache_seqlens[b]), int(counts[b])
        moved = [(k_cache[where(b, int(src[b, i]))].clone(), v_cache[where(b, int(src[b, i]))].clone())
                 for i in range(n)]                     # every source read before any write
        for i, (kk, vv) in enumerate(moved):
            k_cache[where(b, L + i)] = kk
            v_cache[where(b, L + i)] = vv
    cache_seqlens.add_(counts.to(cache_seqlens.dtype))

"""Decode attention over a paged KV cache in fp64 with an explicit mask (the engine's oracle).

Every backend of ``decode_attention`` takes the same lowered problem (the public op has
already rotated q, appended the new k/v into the cache, and turned a contiguous cache into a
paged one with one page per request)::

    q            [T, Hq, D]              the new tokens' queries, packed (request b owns rows
                                         cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1, n_b of them)
    k_cache      [num_blocks, page_size, Hk, D]   (v_cache alike)
    block_table  int32 [B, max_blocks]   logical slot j of request b lives at
                                         (block_table[b, j // page_size], j % page_size)
    cache_seqlens int32 [B]              L_b: tokens cached before this step's n_b new ones,
                                         which sit at logical slots L_b .. L_b + n_b - 1
    tree_mask    int32 [T, W] or None    bit jj of row t: new token jj of t's request is visible
    kv_indices   int32 [B, Hk or Hq, budget] or None: the cached slots each head sees (-1 pads;
                                         entries outside [0, L_b) are ignored)

Query i of request b (row t = cu_seqlens_q[b] + i, logical slot L_b + i) sees key slot j when

    j < L_b + n_b
    and (j < L_b                                       every cached token (with kv_indices:
                                                       only the slots listed for the head)
         or tree bit (j - L_b) of tree_mask[t]         with a tree mask
         or j - L_b <= i  (causal) / True (not causal) without one)
    and (window <= 0 or |L_b + i - j| < window)

    out[t, h] = softmax_j(scale * q[t, h] . k[j, h // (Hq / Hk)]) @ v
    lse[t, h] = log sum_j exp(scale * q . k)   (natural log; -inf and out = 0 with no key)

With ``rot`` (posattn/decode/rotary.py's DecodeRotary: pre-RoPE caches, position maps) q is
``rot.qn`` (already rotated at its positions) and the key at slot j is rotated by the table row
``rot.ktab[:, b or 0, j]`` before the product; with a map, pairs (i, j) where

    distance maps:  qpos[i] - kpos[b or 0, j] >= window       VistaRoPE: not visual[b, L + i] and visual[b, j]

use ``rot.qf`` and keys rotated by ``rot.ktab_far`` instead. The reference computes every
product in fp64 (qk_precision does not apply to the oracle).

The other programs of the same engine (token selection's per-head index lists, position maps)
change only which keys a query sees and at which relative position: ``visible_keys`` below.
"""
from __future__ import annotations

import torch


def visible_keys(b: int, L: int, n: int, t0: int, tree_mask, causal: bool, window: int) -> torch.Tensor:
    """bool [n, L + n] on the CPU: which logical slots each of request b's n queries sees."""
    N = L + n
    i = torch.arange(n)[:, None]
    j = torch.arange(N)[None, :]
    jj = j - L
    if tree_mask is not None:
        rows = tree_mask[t0:t0 + n].to("cpu", torch.int64)                 # [n, W]
        word = rows.gather(1, (jj.clamp(min=0) // 32).expand(n, N))
        new_ok = ((word >> (jj.clamp(min=0) % 32)) & 1).bool()
    elif causal:
        new_ok = jj <= i
    else:
        new_ok = torch.ones(n, N, dtype=torch.bool)
    ok = (j < L) | new_ok
    if window is not None and window > 0:
        d = (L + i) - j
        ok = ok & (d < window) & (-d < window)
    return ok


def gather_request(cache: torch.Tensor, block_table: torch.Tensor, b: int, N: int) -> torch.Tensor:
    """[N, Hk, D]: request b's logical slots 0 .. N-1 read through its block table."""
    ps = cache.shape[1]
    j = torch.arange(N, device=cache.device)
    pages = block_table[b].to(cache.device, torch.int64)[j // ps]
    return cache[pages, j % ps]


def listed(kv_indices, b: int, L: int, N: int, heads: int) -> torch.Tensor:
    """bool [heads, N] on the CPU: the cached slots (< L) each head's index list names."""
    rows = kv_indices[b].to("cpu", torch.int64)                              # [H_idx, budget]
    ok = torch.zeros(rows.shape[0], N + 1, dtype=torch.bool)
    idx = torch.where((rows >= 0) & (rows < L), rows, torch.full_like(rows, N))
    ok.scatter_(1, idx, True)
    ok = ok[:, :N]
    return ok.repeat_interleave(heads // rows.shape[0], dim=0)


def decode_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal: bool,
                     window: int, softmax_scale: float, kv_indices=None, rot=None):
    """fp64 (out [T, Hq, D], lse [T, Hq]) on q's device, per the module docstring."""
    T, HQ, D = q.shape
    HK = k_cache.shape[2]
    G = HQ // HK
    out = torch.zeros(T, HQ, D, dtype=torch.float64, device=q.device)
    lse = torch.full((T, HQ), float("-inf"), dtype=torch.float64, device=q.device)
    cs = cache_seqlens.to("cpu", torch.int64).tolist()
    cu = cu_seqlens_q.to("cpu", torch.int64).tolist()
    for b in range(len(cs)):
        t0, t1 = cu[b], cu[b + 1]
        n, L = t1 - t0, cs[b]
        if n == 0:
            continue
        N = L + n
        K = gather_request(k_cache, block_table, b, N).to(torch.float64)
        Kf = None
        if rot is not None and rot.ktab is not None:
            K, Kf = _rotate_keys(K, rot, b, N)
        K = K.repeat_interleave(G, dim=1)
        V = gather_request(v_cache, block_table, b, N).to(torch.float64).repeat_interleave(G, dim=1)
        ok = visible_keys(b, L, n, t0, tree_mask, causal, window)[None]            # [1, n, N]
        if kv_indices is not None:   # cached slots: only the listed ones, per head
            cached = torch.arange(N) < L
            ok = ok & (~cached | listed(kv_indices, b, L, N, HQ))[:, None, :]       # [Hq, n, N]
        qb = (rot.qn if rot is not None else q)[t0:t1].to(torch.float64)
        s = torch.einsum("ihd,jhd->hij", qb, K) * softmax_scale
        if Kf is not None:
            sf = torch.einsum("ihd,jhd->hij", rot.qf[t0:t1].to(torch.float64), Kf.repeat_interleave(G, dim=1))
            s = torch.where(_far(rot, b, L, t0, n, N).to(q.device), sf * softmax_scale, s)
        s = s.masked_fill(~ok.to(q.device), float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = torch.einsum("hij,jhd->ihd", p / torch.where(l > 0, l, torch.ones_like(l)), V)
        out[t0:t1] = o
        lse[t0:t1] = (m + torch.log(l)).squeeze(-1).transpose(0, 1)
    return out, lse


def _rotate_keys(K, rot, b: int, N: int):
    """(near, far or None) fp64 [N, Hk, D]: request b's keys rotated by the tables' rows."""
    from posattn.kernels.reference.select_scores import rotate_table

    def by(tab):
        t = tab[:, b if tab.shape[1] > 1 else 0].to(K.device, torch.float64)              # [2, S or 1, R/2]
        t = t.expand(2, N, t.shape[-1]) if t.shape[1] == 1 else t[:, :N]
        return rotate_table(K, t[0][:, None, :], t[1][:, None, :], rot.rotary_dim, rot.interleaved)

    return by(rot.ktab), (by(rot.ktab_far) if rot.ktab_far is not None else None)


def _far(rot, b: int, L: int, t0: int, n: int, N: int) -> torch.Tensor:
    """bool [n, N] on the CPU: the pairs (query i, slot j) that take the far rotation."""
    if rot.visual is not None:
        vis = rot.visual[b].to("cpu").bool()
        return ~vis[L:L + n, None] & vis[None, :N]
    kp = rot.kpos[b if rot.kpos.shape[0] > 1 else 0, :N].to("cpu", torch.float64)
    qp = rot.qpos[t0:t0 + n].to("cpu", torch.float64)
    return (qp[:, None] - kp[None, :]) >= rot.window

"""fp64 reference of posattn.select.scores' kernel (the lowered problem every backend shares).

Contract: ``scores(q [B, Hq, D] (already rotated when rope is on), k_cache [num_blocks, page_size, Hk, D],
block_table int32 [B, max_blocks], cache_seqlens int32 [B], scale, ktab, rotary_dim, interleaved)``
-> fp32 [B, Hq, S_max], S_max = max_blocks * page_size (``vote=True``: [B, 1, S_max], see below):

    out[b, h, s] = scale * sum_d q[b, h, d] * rot(k)[s, h // G, d]   for s < min(cache_seqlens[b], S_max)
                 = -inf                                              otherwise

with k at logical slot s read from page ``block_table[b, s // page_size]``, row ``s % page_size``,
and ``rot`` the rotary embedding by the fp32 table ``ktab [2 (cos, sin), B or 1, S_max, R/2]``
(None: keys used as stored) over the first ``rotary_dim`` dims, pairs (p, p + R/2) or (2p, 2p+1).
With a position map, ``far = (q_far [B, Hq, D], ktab_far (as ktab), far_mask uint8 [B, S_max])``:
slot s of request b is scored ``scale * q_far . rot_far(k)`` where ``far_mask[b, s]``, as above elsewhere.
``reduce="kv_group"`` reaches the kernels as q summed over each group (Hq = Hk; the op sums, exact
by linearity). ``vote=True`` (TokenSelect's soft vote) returns

    vote[b, 0, s] = sum_h softmax(out[b, h, :L])[s]   for s < L = min(cache_seqlens[b], S_max), -inf otherwise.
"""
from __future__ import annotations

import torch


def rotate_table(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                 interleaved: bool) -> torch.Tensor:
    """x [..., D] rotated by cos/sin [..., R/2] (broadcasting) over its first rotary_dim dims."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        h = rotary_dim // 2
        x1, x2 = rot[..., :h], rot[..., h:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def gather_keys(k_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[B, S_max, Hk, D] in k_cache's dtype: logical slots through the block table (entries
    outside the cache read page 0: they lie past the lengths and are masked)."""
    NB, PS = k_cache.shape[:2]
    bt = block_table.to(torch.int64)
    bt = torch.where((bt >= 0) & (bt < NB), bt, torch.zeros_like(bt))
    return k_cache[bt].reshape(bt.shape[0], bt.shape[1] * PS, *k_cache.shape[2:])


def soft_vote(out: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """[B, H, S] per-head scores (-inf past the lengths) -> [B, 1, S] in out's dtype (see the contract)."""
    S = out.shape[-1]
    # a request with no cached token has an all -inf row: its softmax is NaN, its votes 0
    p = torch.softmax(out, dim=-1).nan_to_num_(0.0).sum(1, keepdim=True)
    L = cache_seqlens.to(torch.int64).clamp(0, S)[:, None, None]
    return torch.where(torch.arange(S, device=out.device) < L, p, torch.full_like(p, -float("inf")))


def scores(q, k_cache, block_table, cache_seqlens, scale: float, ktab, rotary_dim: int, interleaved: bool,
           vote: bool = False, far=None):
    B, HQ, D = q.shape
    HK = k_cache.shape[2]
    k0 = gather_keys(k_cache, block_table).to(torch.float64)                   # [B, S, Hk, D]
    S = k0.shape[1]

    def product(qq, tab):
        k = k0
        if tab is not None:
            t = tab.to(torch.float64)
            k = rotate_table(k, t[0][:, :, None, :], t[1][:, :, None, :], rotary_dim, interleaved)
        k = k.repeat_interleave(HQ // HK, dim=2)                               # [B, S, Hq, D]
        return torch.einsum("bhd,bshd->bhs", qq.to(torch.float64), k) * scale

    out = product(q, ktab)
    if far is not None:
        out = torch.where(far[2].bool()[:, None, :], product(far[0], far[1]), out)
    L = cache_seqlens.to(torch.int64).clamp(0, S)[:, None, None]
    s = torch.arange(S, device=q.device)[None, None, :]
    out = torch.where(s < L, out, torch.full_like(out, -float("inf")))
    return (soft_vote(out, cache_seqlens) if vote else out).to(torch.float32)

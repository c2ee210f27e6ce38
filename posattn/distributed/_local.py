"""Attention of a query shard against one K/V block at global token offsets, and its backward.

The ring of posattn.distributed.anchor_attention needs "queries at global indices iq against
keys at global indices ik" returning (out, lse), and the backward of that block given the
*merged* lse and delta. posattn's attention kernels (C++ / Triton) take q and k over one
shared token index (key j and query i are both rows of the same packed step), so they cannot
serve a block whose keys live at other offsets without a kernel change; until they take a key
offset, the blocks here are dense masked products in torch, in fp32 (fp64 for fp64 inputs),
with the mask built from the step's token metadata for the block pair only (O(Tq * Tk) per
block, never O(T^2)):

    allowed(i, j) = (doc(i) == doc(j) and order(i, j) and in_window(i, j))
                    or (row(i) == row(j) and j < row_start(i) + num_anchors and order(i, j))

exactly the mask of posattn.attention.masks / kernels.reference.attention.build_mask.
Queries are processed in tiles of ``TILE`` rows, so a block's scores never exceed
[Hq, TILE, Tk] (the mask is built per tile too). Each tile's products cover only the bounding
box of its mask's visible entries (rows and keys; one host read per tile): a tile nobody in
it can see costs its mask only, and a causal tile skips the keys after its last query.
"""
from __future__ import annotations

import torch

TILE = 256           # query rows per product: bounds the scores' memory to Hq * TILE * Tk; 256 rows
#                      keep a causal tile's box tight (1024 was 1.5-2x slower on CPU: docs/distributed.md)


def _tiles(n: int):
    return [(a, min(n, a + TILE)) for a in range(0, n, TILE)]


def _box(m: torch.Tensor):
    """(r0, r1, c0, c1): the bounding box [r0, r1) x [c0, c1) of m's True entries, or None when
    m [n, Tk] has none (one host read)."""
    n, k = m.shape
    if n == 0 or k == 0:
        return None
    ra, ca = m.any(1).to(torch.int8), m.any(0).to(torch.int8)
    has, r0, rl, c0, cl = torch.stack((ra.max(), ra.argmax(), ra.flip(0).argmax(), ca.argmax(),
                                       ca.flip(0).argmax())).tolist()
    return (r0, n - rl, c0, k - cl) if has else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_mask(iq: torch.Tensor, ik: torch.Tensor, doc: torch.Tensor, row_start: torch.Tensor, num_anchors: int,
               causal: bool, window: int | None, anchor_keys: bool) -> torch.Tensor:
    """bool [Tq, Tk]: may global query iq[a] see global key ik[b]?

    doc, row_start: int64 [T] per-token document id and first token of its row.
    anchor_keys=False: the keys are ring keys, anchor tokens among them are hidden (they are
    attended once, in the anchor block); True: the keys are the step's anchor tokens and the
    full mask applies.
    """
    i, j = iq[:, None], ik[None, :]
    m = doc[iq][:, None] == doc[ik][None, :]
    if causal:
        m &= j <= i
    if window is not None:
        m &= (i - j < window) if causal else ((i - j).abs() < window)
    if num_anchors:
        rs_k = row_start[ik][None, :]
        if anchor_keys:
            rs_q = row_start[iq][:, None]
            a = (rs_q == rs_k) & (j < rs_q + num_anchors)
            if causal:
                a &= j <= i
            m |= a
        else:
            m &= j >= rs_k + num_anchors
    return m


def _scores(q, k, mask, scale):
    """q: [Tq, Hq, D], k: [Tk, Hk, D] (compute dtype) -> masked scores [Hk, g, Tq, Tk]."""
    Tq, HQ, D = q.shape
    HK = k.shape[1]
    s = torch.einsum("qhgd,khd->hgqk", q.reshape(Tq, HK, HQ // HK, D), k) * scale
    return s.masked_fill(~mask, float("-inf"))


def block_forward(q, k, v, mask_of, scale):
    """q: [Tq, Hq, D]; k, v: [Tk, Hk, D]; mask_of(a, b): bool [b - a, Tk] for query rows a..b.

    Returns (out [Tq, Hq, D], lse [Hq, Tq]) in the compute dtype; a query that sees no key of
    the block gets out = 0 and lse = -inf.
    """
    ct = compute_dtype(q.dtype)
    Tq, HQ, D = q.shape
    kf, vf = k.to(ct), v.to(ct)
    out = torch.zeros((Tq, HQ, D), dtype=ct, device=q.device)
    lse = torch.full((HQ, Tq), float("-inf"), dtype=ct, device=q.device)
    for a0, b0 in _tiles(Tq):
        m = mask_of(a0, b0)
        box = _box(m)
        if box is None:                                                    # nothing visible: out 0, lse -inf
            continue
        r0, r1, c0, c1 = box
        a, b = a0 + r0, a0 + r1
        s = _scores(q[a:b].to(ct), kf[c0:c1], m[r0:r1, c0:c1], scale)
        l = torch.logsumexp(s, -1)                                         # [Hk, g, rows]
        p = torch.exp(s - l.masked_fill(torch.isinf(l), 0.0)[..., None])
        out[a:b] = torch.einsum("hgqk,khd->qhgd", p, vf[c0:c1]).reshape(b - a, HQ, D)
        lse[:, a:b] = l.reshape(HQ, b - a)
    return out, lse


def block_backward(dout, q, k, v, mask_of, lse, delta, scale):
    """The block's share of the gradients, given the merged lse [Hq, Tq] and
    delta = rowsum(dout * out) - dlse [Hq, Tq] (FlashAttention-2's backward, one block):

        p = exp(s - lse); dv = p^T dout; ds = p * (dout v^T - delta); dq = scale ds k; dk = scale ds^T q

    dout: [Tq, Hq, D]. Returns (dq [Tq, Hq, D], dk [Tk, Hk, D], dv [Tk, Hk, D]) in the compute dtype.
    """
    ct = compute_dtype(q.dtype)
    Tq, HQ, D = q.shape
    HK = k.shape[1]
    g = HQ // HK
    kf, vf = k.to(ct), v.to(ct)
    dq = torch.zeros((Tq, HQ, D), dtype=ct, device=q.device)
    dk = torch.zeros(kf.shape, dtype=ct, device=q.device)
    dv = torch.zeros(vf.shape, dtype=ct, device=q.device)
    for a0, b0 in _tiles(Tq):
        m = mask_of(a0, b0)
        box = _box(m)
        if box is None:                                  # nothing visible: no gradient from this tile
            continue
        r0, r1, c0, c1 = box
        a, b = a0 + r0, a0 + r1
        n = b - a
        qf = q[a:b].to(ct)
        do = dout[a:b].to(ct).reshape(n, HK, g, D)
        kb, vb = kf[c0:c1], vf[c0:c1]
        s = _scores(qf, kb, m[r0:r1, c0:c1], scale)
        lse4 = lse[:, a:b].to(ct).reshape(HK, g, n, 1)
        p = torch.exp(s - lse4.masked_fill(torch.isinf(lse4), 0.0))
        dv[c0:c1] += torch.einsum("hgqk,qhgd->khd", p, do)
        dp = torch.einsum("qhgd,khd->hgqk", do, vb)
        ds = p * (dp - delta[:, a:b].to(ct).reshape(HK, g, n, 1))
        dq[a:b] = torch.einsum("hgqk,khd->qhgd", ds, kb).reshape(n, HQ, D) * scale
        dk[c0:c1] += torch.einsum("hgqk,qhgd->khd", ds, qf.reshape(n, HK, g, D)) * scale
    return dq, dk, dv


def merge(out, lse, out_b, lse_b):
    """Merge a block's (out_b, lse_b) into the running (out, lse) by log-sum-exp (in place on out).

    out: [Tq, Hq, D]; lse: [Hq, Tq]. Returns the new (out, lse).
    """
    new = torch.logaddexp(lse, lse_b)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    wa = torch.exp(lse - safe).transpose(0, 1)[..., None]
    wb = torch.exp(lse_b - safe).transpose(0, 1)[..., None]
    out.mul_(wa).add_(out_b * wb)
    return out, new

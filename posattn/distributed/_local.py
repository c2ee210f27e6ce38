"""Attention of a query shard against one K/V block at global token offsets, and its backward.

The ring of posattn.distributed.anchor_attention needs "queries at global indices iq against
keys at global indices ik" returning (out, lse), and the backward of that block given the
*merged* lse and delta. Two engines compute it (anchor_attention's ``block_engine``):

* "kernel": posattn's C++ attention kernel over the block's *rectangle* of the step
  (rect_forward / rect_backward): queries and keys are rows of their own tensors, read at the
  global tokens iq / ik (int32, ascending: a rank's shard is a few contiguous ranges), and the
  mask is evaluated on those global indices from the step's doc_start / row_start
  (csrc/cpu/attention_cpu.h attn_set_rect). posattn.attention.masks.lower_rect lists, per query
  block, only the key blocks its documents, window and anchors can reach, so invisible key tiles
  are never visited. Memory O(Tq + Tk) per block; CPU only (fp32 compute; the Triton kernels
  take no rectangle yet).
* "torch" (the default, and the oracle; fp64 and any device): dense masked products in torch,
  in fp32 (fp64 for fp64 inputs), with the mask built from the step's token metadata for the
  block pair only (O(Tq * Tk) per block, never O(T^2)). On CPU its BLAS products are faster than
  the kernel's per-pair loops at head_dim 64 (docs/distributed.md), hence the default.

Both use the mask

    allowed(i, j) = (doc(i) == doc(j) and order(i, j) and in_window(i, j))
                    or (row(i) == row(j) and j < row_start(i) + num_anchors and order(i, j))

exactly the mask of posattn.attention.masks / kernels.reference.attention.build_mask, with ring
keys hiding anchor keys (the anchor block shows them: block_mask). The torch engine processes
queries in tiles of ``TILE`` rows, so a block's scores never exceed [Hq, TILE, Tk] (the mask is
built per tile too). Each tile's products cover only the bounding box of its mask's visible
entries (rows and keys; one host read per tile): a tile nobody in it can see costs its mask
only, and a causal tile skips the keys after its last query.
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


# ---- the kernel path: posattn's C++ attention kernel over a rectangle of the step ----
BLOCK_M, BLOCK_N = 32, 64      # the C++ anchor-attention defaults (posattn.attention.backends)


def kernel_available() -> bool:
    from posattn.kernels import cpu as _cpu

    return _cpu._C is not None


def kernel_ok(q: torch.Tensor) -> bool:
    """Whether blocks of q's dtype / device can run on the C++ kernel (it computes in fp32: fp64
    stays on the torch blocks, as does any device but the CPU: the Triton kernels take no
    rectangle yet)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and kernel_available()


def rect_lists(spec, tokens, iq: torch.Tensor, ik: torch.Tensor, hide_anchor_keys: bool):
    """(lists, iq int32, ik int32) of the rectangle iq x ik (global indices, int64, ascending)."""
    from posattn.attention.masks import lower_rect

    lists = lower_rect(spec, tokens, iq, ik, BLOCK_M, BLOCK_N, hide_anchor_keys)
    return lists, iq.to(torch.int32).contiguous(), ik.to(torch.int32).contiguous()


def rect_forward(q, k, v, rect, spec, scale, hide_anchor_keys):
    """block_forward on the kernel: rect = rect_lists(...); returns fp32 (out [Tq, Hq, D], lse [Hq, Tq])."""
    from posattn.kernels import cpu as _cpu
    from posattn.kernels.cpu_attention import rect_forward as f

    lists, iq, ik = rect
    return f(q, k, v, lists, iq, ik, spec.num_anchors, spec.causal, spec.window, scale, hide_anchor_keys,
             _cpu._threads({}))


def rect_backward(dout, q, k, v, rect, spec, lse, delta, scale, hide_anchor_keys):
    """block_backward on the kernel (merged lse, delta [Hq, Tq]); returns fp32 (dq, dk, dv)."""
    from posattn.kernels import cpu as _cpu
    from posattn.kernels.cpu_attention import rect_backward as f

    lists, iq, ik = rect
    return f(dout, q, k, v, lse, delta, lists, iq, ik, spec.num_anchors, spec.causal, spec.window, scale,
             hide_anchor_keys, _cpu._threads({}))


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

"""A plan for anchor_attention: everything that depends on the batch layout, done once.

    p = posattn.attention.plan(q, k, cu_seqlens, cu_rows=rows, num_anchors=1, rope=spec, max_seqlen=S)
    for step in steps:                       # same layout: no host sync in any call
        out = posattn.anchor_attention(q, k, v, cu_seqlens, cu_rows=rows, rope=spec, positions=pos, plan=p)

Building the plan checks the boundaries' values on the host (one copy), chooses the backend
and launch config, resolves the rotary tables (a DynamicNTK / LongRoPE scaling needs
``max_seqlen``, the largest position + 1, instead of reading the positions) and lowers the mask
to block visit lists for the forward and, with their transpose, for the backward. A call with
the plan only checks shapes, dtypes and devices (Python integers), builds the call's cos/sin
table on the device and launches: no .item(), .tolist() or .cpu(), so a training step with a
fixed layout can be captured in a CUDA graph. (The reference backend evaluates a dense mask on
the host: it is the oracle, not a planned path.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.attention import _op
from posattn.attention import anchor as A
from posattn.attention.masks import MaskSpec, lower


_PLANS = object()   # an argument left to the plan


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """A checked, lowered anchor-attention layout (build with :func:`plan`)."""

    T: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    cu_seqlens: torch.Tensor
    cu_rows: torch.Tensor
    spec: MaskSpec
    rope: object                   # RopeSpec or None
    rope_args: tuple | None        # anchor.rope_tables: (inv_freq, rotary_dim, interleaved, scaling, extras)
    backend: str
    lists: tuple                   # the op's encoding (see _op.py)
    blocks: tuple
    qk_precision: str = "bf16"
    position_map: object = None    # posattn.position_maps map or None

    def _mismatch(self, name, got, want):
        return ValueError(f"{name} ({got}) differs from the plan's ({want}); build a new plan for this layout")

    def run(self, q, k, v, *, cu_seqlens=None, cu_rows=None, num_anchors=_PLANS, causal=_PLANS, window=_PLANS,
            softmax_scale=None, rope=_PLANS, positions=None, return_lse=False, backend=None, qk_precision=_PLANS,
            position_map=_PLANS):
        """anchor_attention with this plan (see its docstring); no host synchronisation. Mask
        arguments left out are the plan's; given ones must equal the plan's."""
        A.check_qkv(q, k, v)
        T, HQ, D = q.shape
        got = (T, HQ, k.shape[1], D, q.dtype, q.device)
        want = (self.T, self.heads_q, self.heads_k, self.head_dim, self.dtype, self.device)
        if got != want:
            raise self._mismatch("q/k shape, dtype and device (T, Hq, Hk, D, dtype, device)", got, want)
        if cu_seqlens is not None and cu_seqlens is not self.cu_seqlens:
            raise ValueError("cu_seqlens must be the plan's own tensor (or None): the plan holds the layout it "
                             "checked; build a new plan for another layout")
        if cu_rows is not None and cu_rows is not self.cu_rows:
            raise ValueError("cu_rows must be the plan's own tensor (or None); build a new plan for another layout")
        for name, val, mine in (("num_anchors", num_anchors, self.spec.num_anchors),
                                ("causal", causal, self.spec.causal), ("window", window, self.spec.window)):
            if val is not _PLANS and val != mine:
                raise self._mismatch(name, val, mine)
        if rope is not _PLANS and rope != self.rope:
            raise self._mismatch("rope", rope, self.rope)
        if position_map is not _PLANS and position_map is not self.position_map and position_map != self.position_map:
            raise self._mismatch("position_map", position_map, self.position_map)
        if backend is not None and backend != self.backend:
            raise self._mismatch("backend", backend, self.backend)
        if qk_precision is not _PLANS and qk_precision != self.qk_precision:
            A.check_qk_precision(qk_precision)
            raise self._mismatch("qk_precision", qk_precision, self.qk_precision)
        softmax_scale = A.check_scale(softmax_scale, D)
        V.boolean(return_lse, "return_lse")
        A.check_rope(self.rope, positions, T, D, q.device)
        pm = A.check_map(self.position_map, self.rope, T, q.device)
        ra = self.rope_args
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        w = -1 if self.spec.window is None else self.spec.window
        out, lse, _table = _op.anchor_attention_op(
            q, k, v, self.cu_seqlens, self.cu_rows, list(self.lists), list(self.blocks), self.spec.num_anchors,
            self.spec.causal, w, softmax_scale, positions.contiguous() if ra else None, ra[0] if ra else None,
            ra[1] if ra else 0, ra[2] if ra else False, ra[3] if ra else 1.0, self.backend, self.qk_precision,
            *(ra[4] if ra else (None, None, None)), *pm)
        return (out, lse) if return_lse else out

    __call__ = run


def plan(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, *, cu_rows: torch.Tensor | None = None,
         num_anchors: int = 1, causal: bool = True, window: int | None = None, rope=None,
         max_seqlen: int | None = None, backend: str | None = None, backward: bool = True,
         qk_precision: str = "bf16", position_map=None) -> AttentionPlan:
    """Check, choose and lower once for a batch layout; see the module docstring.

    Args:
        q: [T, Hq, D], k: [T, Hk, D]: tensors of the calls' shape, dtype and device (only those
            are read). cu_seqlens, cu_rows, num_anchors, causal, window, rope, backend: as
            :func:`posattn.anchor_attention` takes them; calls with the plan must pass the same.
        max_seqlen: the largest position + 1 the calls will use; required with a rotary scaling
            whose tables depend on it (DynamicNTK, LongRoPE), ignored otherwise.
        backward: also lower the backward's lists (default), so that gradients make no host sync.
        qk_precision: as :func:`posattn.anchor_attention` takes it; calls with the plan use it.
        position_map: as :func:`posattn.anchor_attention` takes it (VistaRoPE's visual [T] is the
            plan's; calls with the plan use it).
    """
    for name, x in (("q", q), ("k", k)):
        V.float_tensor(x, name)
    A.check_qkv(q, k, k)
    T, HQ, D = q.shape
    A._check_boundaries(cu_seqlens, "cu_seqlens", q.device)
    if cu_rows is None:
        cu_rows = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    else:
        A._check_boundaries(cu_rows, "cu_rows", q.device)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=window)
    V.boolean(backward, "backward")
    A.check_qk_precision(qk_precision)
    ra = None
    if rope is not None:
        A.check_rope_spec(rope, D)
        seq_len = None
        if rope.depends_on_seq_len:
            if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
                raise ValueError(f"max_seqlen must be a positive int (the largest position + 1) with a rotary "
                                 f"scaling that depends on the sequence length; got {max_seqlen!r}")
            seq_len = max_seqlen
        ra = A.rope_tables(rope, q.device, seq_len)
        A.check_rope_heads(ra, HQ, k.shape[1])
    pm = A.check_map(position_map, rope, T, q.device)
    A.check_boundary_values(T, cu_seqlens, cu_rows, num_anchors)
    rot, inter = (ra[1], ra[2]) if ra else (0, False)
    key = _op.key_of(q, k, rot, inter, causal, -1 if window is None else window, num_anchors, qk_precision, pm[0])
    kernel, config = dispatch.select("anchor_attention", key, backend=backend, device_index=q.device.index)
    lists, blocks = [], []
    if kernel.fn.uses_lists:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        bbm, bbn = config.get("BWD_BLOCK_M", bm), config.get("BWD_BLOCK_N", bn)
        same = (bbm, bbn) == (bm, bn)
        lists = _op.pack(lower(spec, cu_seqlens, cu_rows, T, bm, bn, transpose=same and backward))
        blocks = [bm, bn]
        if backward and not same:
            lists += _op.pack(lower(spec, cu_seqlens, cu_rows, T, bbm, bbn))
            blocks += [bbm, bbn]
    return AttentionPlan(T, HQ, k.shape[1], D, q.dtype, q.device, cu_seqlens, cu_rows, spec, rope, ra,
                         kernel.backend, tuple(lists), tuple(blocks), qk_precision, position_map)

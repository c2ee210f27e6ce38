"""anchor_attention: the public op and its argument checks.

The op itself (torch.library registration, autograd) is in _op.py, the kernels' registry
lines in backends.py, and the sync-free planned path in plan.py.
"""
from __future__ import annotations

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.attention import _op
from posattn.attention.backends import MAX_HEAD_DIM, AttnKey  # noqa: F401  (AttnKey: public name)
from posattn.attention.masks import MaskSpec, lower

_POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# validation


def _check_boundaries(x, name: str, device) -> None:
    V.tensor(x, name)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor of boundaries [N+1]; got {x.dtype}")
    if x.dim() != 1 or x.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries ([0, ..., T]); got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; all tensors must be on one device")


def check_boundary_values(T: int, cu_seqlens: torch.Tensor, cu_rows: torch.Tensor, num_anchors: int) -> None:
    """Value checks on a host copy of the boundaries (one small device-to-host copy)."""
    both = torch.cat((cu_seqlens, cu_rows)).cpu().tolist()
    cs, cr = both[:cu_seqlens.shape[0]], both[cu_seqlens.shape[0]:]
    for name, b in (("cu_seqlens", cs), ("cu_rows", cr)):
        if b[0] != 0 or b[-1] != T:
            raise ValueError(f"{name} must start at 0 and end at T = {T} (q's token count); "
                             f"got first {b[0]}, last {b[-1]}")
        bad = next((i for i in range(len(b) - 1) if b[i + 1] < b[i]), None)
        if bad is not None:
            raise ValueError(f"{name} must be sorted (non-decreasing); {name}[{bad}] = {b[bad]} > "
                             f"{name}[{bad + 1}] = {b[bad + 1]}")
    docs = set(cs)
    off = [r for r in cr if r not in docs]
    if off:
        raise ValueError(f"cu_rows must fall on document boundaries (values of cu_seqlens); "
                         f"row boundary {off[0]} is inside a document")
    if num_anchors:
        import bisect

        for r0, r1 in zip(cr[:-1], cr[1:]):
            if r1 == r0:
                continue
            first_end = cs[bisect.bisect_right(cs, r0)]
            if num_anchors > first_end - r0:
                raise ValueError(f"num_anchors ({num_anchors}) must not exceed the length of each row's first "
                                 f"document; the row starting at token {r0} begins with a document of "
                                 f"{first_end - r0} tokens")


def check_rope_spec(rope, D: int) -> None:
    from posattn.rope.spec import RopeSpec

    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a posattn.RopeSpec or None, got {type(rope).__name__}")
    if rope.head_dim != D:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal q's head_dim ({D})")


def check_rope(rope, positions, T: int, D: int, device) -> None:
    """Argument checks of ``rope`` and ``positions`` [T] ([n_axes, T] with mrope sections; no host sync)."""
    if rope is None:
        if positions is not None:
            raise ValueError("positions were given without rope: pass rope=RopeSpec(...) to rotate q and k, "
                             "or drop positions")
        return
    check_rope_spec(rope, D)
    if positions is None:
        raise ValueError("positions [T] are required with rope")
    V.tensor(positions, "positions")
    if positions.dtype not in _POS_DTYPES:
        raise TypeError(f"positions must be int32, int64, float32 or float64; got {positions.dtype}")
    A = rope.n_axes
    want = (T,) if A == 1 else (A, T)
    if tuple(positions.shape) != want:
        what = "[T] = " if A == 1 else "[n_axes, T] = "
        why = "one per packed token" if A == 1 else f"one per packed token on each of the spec's {A} mrope axes"
        raise ValueError(f"positions must be {what}{list(want)} ({why}); got shape {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but q is on {device}; "
                         f"all tensors must be on one device")


def rope_tables(rope, device, seq_len: int | None):
    """(inv_freq fp32 [R/2] or per head [rows, R/2] on ``device``, rotary_dim, interleaved,
    attention_scaling, (pair_axis, pair_pos_scale, pair_q_offset)) of ``rope`` (posattn.lowered.RopeTables:
    mrope sections, DPE; None where the spec has none); ``seq_len`` matters only for scalings
    that depend on it (DynamicNTK, LongRoPE)."""
    if torch.compiler.is_compiling() and rope.depends_on_seq_len:
        raise ValueError("rope: a scaling whose tables depend on the sequence length (DynamicNTK, LongRoPE) "
                         "cannot be traced by torch.compile without a plan; build "
                         "posattn.attention.plan(..., max_seqlen=...) outside the compiled region")
    tables = rope.tables(device, seq_len)      # traceable: built at trace time under torch.compile
    extras = tuple(None if t is None else t.contiguous()
                   for t in (tables.pair_axis, tables.pair_pos_scale, tables.pair_q_offset))
    return (tables.inv_freq.to(torch.float32).contiguous(), rope.rotary_dim, rope.interleaved,
            float(tables.attention_scaling), extras)


def check_rope_heads(ra, HQ: int, HK: int) -> None:
    """Per-head frequency rows must divide both head counts (head h reads row h // (H // rows))."""
    if ra is not None and ra[0].dim() == 2:
        rows = ra[0].shape[0]
        if HQ % rows or HK % rows:
            raise ValueError(f"rope: the spec's per-head inv_freq has {rows} rows, which must divide q's head "
                             f"count ({HQ}) and k's ({HK})")


def check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.float_tensor(x, name)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D packed [T, H, D]; got shape {tuple(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}; got k {k.dtype}, v {v.dtype}")
    V.same_device(q, "q", k=k, v=v)
    T, HQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k must be [T, Hk, D] = [{T}, Hk, {D}] like q; got {tuple(k.shape)}")
    HK = k.shape[1]
    if HK == 0 or HQ % HK:
        raise ValueError(f"q's head count ({HQ}) must be a multiple of k's ({HK}) (GQA)")
    if D > MAX_HEAD_DIM or D == 0:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}; got {D}")


def check_map(position_map, rope, T: int, device) -> tuple:
    """posattn.position_maps.kernel_args of ``position_map`` after its checks (a map needs a
    single-axis ``rope``; VistaRoPE's visual must be bool [T] on q's device); no host sync."""
    from posattn import position_maps as PM

    m = PM.check_position_map(position_map, rope)
    if isinstance(m, PM.VistaRoPE):
        m.check_visual((T,), device, "one flag per packed token")
    return PM.kernel_args(m)


QK_PRECISIONS = ("bf16", "bf16x3", "fp32")


def check_qk_precision(qk_precision) -> str:
    if not isinstance(qk_precision, str):
        raise TypeError(f"qk_precision must be a str, one of {QK_PRECISIONS}; got {type(qk_precision).__name__}")
    if qk_precision not in QK_PRECISIONS:
        raise ValueError(f"qk_precision must be one of {QK_PRECISIONS}; got {qk_precision!r}")
    return qk_precision


def check_scale(softmax_scale, D: int) -> float:
    if softmax_scale is None:
        return D ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    return float(softmax_scale)


def needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


# ---------------------------------------------------------------------------
# the public op


def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     cu_rows: torch.Tensor | None = None, num_anchors: int = 1, causal: bool = True,
                     window: int | None = None, softmax_scale: float | None = None, rope=None,
                     positions: torch.Tensor | None = None, return_lse: bool = False,
                     backend: str | None = None, plan=None, qk_precision: str | None = None,
                     position_map=None):
    """Attention over packed documents, each row sharing an anchor prefix (AnchorAttention).

    Args:
        q: [T, Hq, D] packed queries; k, v: [T, Hk, D] with Hq a multiple of Hk (GQA);
            D <= 256; float16, bfloat16 or float32 (float64 on the reference backend).
        cu_seqlens: int32 [N+1] document boundaries (0, ..., T), as flash-attn's varlen functions.
        cu_rows: int32 [R+1] row boundaries, on document boundaries; default one row of all T tokens.
        num_anchors: the first ``num_anchors`` tokens of each row (inside its first document) are
            visible to every query of that row; 0 gives plain document-masked attention.
        causal: hide keys after the query.
        window: hide keys ``window`` or more positions before the query (also after it when not
            causal); anchors stay visible.
        softmax_scale: default D ** -0.5.
        rope: a :class:`posattn.RopeSpec` (any: scalings, per-head frequency rows, mrope sections
            including Qwen3-VL's interleaved ones, DPE); q and k are rotated by ``positions`` inside
            the kernel, reading cos/sin tables built once per call with the exact angle reduction
            (posattn.rope.table.attention_tables): the same as ``apply_rope`` then attention (to fp32
            rounding), without the extra pass over memory.
        positions: [T] int or float positions ([n_axes, T] with mrope sections; integers exact
            below 2^31), required with ``rope``.
        qk_precision: how the rotated q and k (16-bit inputs with ``rope``) are multiplied:
            "bf16" (default) rounds them to the input dtype first, as ``apply_rope`` then
            attention does; "bf16x3" splits each fp32-rotated value into bf16 hi + lo and sums
            hi.hi + hi.lo + lo.hi with fp32 accumulation (scores to ~2^-16 relative, so that
            they keep RoPE's relative-position property at large positions; docs/numerics.md);
            "fp32" multiplies in fp32 (slow; for reference runs). fp32 inputs, and q/k
            without rope, are multiplied exactly as given whatever the mode. The C++ CPU
            kernel computes "bf16x3" in fp32. None: "bf16", or the plan's with ``plan``.
        position_map: None or a relative-position map (:class:`posattn.ReRoPE`, ``LeakyReRoPE``,
            ``SelfExtend``, ``VistaRoPE``; posattn.position_maps), with ``rope`` (single axis):
            k is given *before* RoPE and each (query i, key j) pair is rotated near (q at p_i, k
            at p_j) or far (q at far_q(i), k at far_k(j)) as the map says, in one pass (a key
            tile that straddles the map's window computes both products, others one).
            VistaRoPE's ``visual`` is bool [T] over the packed tokens.
        return_lse: also return the log-sum-exp.
        backend: force "triton", "cpu" (C++) or "reference".
        plan: a :func:`posattn.attention.plan` for this batch layout: the call then makes no
            host synchronisation (CUDA-graph capturable). The mask arguments (``cu_seqlens``,
            ``cu_rows``, ``num_anchors``, ``causal``, ``window``, ``rope``, ``backend``) must be
            the plan's (``position_map`` too: None means the plan's); without a plan every call
            checks the boundaries' values on the host.

    Returns:
        out [T, Hq, D] in q's dtype, and with ``return_lse`` the fp32 log-sum-exp [Hq, T].
        Differentiable in q, k and v.
    """
    if plan is not None:
        from posattn.attention.plan import AttentionPlan

        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"plan must be a posattn.attention.AttentionPlan, got {type(plan).__name__}")
        return plan.run(q, k, v, cu_seqlens=cu_seqlens, cu_rows=cu_rows, num_anchors=num_anchors, causal=causal,
                        window=window, softmax_scale=softmax_scale, rope=rope, positions=positions,
                        return_lse=return_lse, backend=backend,
                        **({} if qk_precision is None else {"qk_precision": qk_precision}),
                        **({} if position_map is None else {"position_map": position_map}))
    check_qkv(q, k, v)
    T, _, D = q.shape
    _check_boundaries(cu_seqlens, "cu_seqlens", q.device)
    if cu_rows is None:
        cu_rows = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    else:
        _check_boundaries(cu_rows, "cu_rows", q.device)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=window)   # validates the three
    softmax_scale = check_scale(softmax_scale, D)
    V.boolean(return_lse, "return_lse")
    qk_precision = check_qk_precision("bf16" if qk_precision is None else qk_precision)
    check_rope(rope, positions, T, D, q.device)
    pm = check_map(position_map, rope, T, q.device)
    ra = None
    if rope is not None:
        seq_len = None
        if rope.depends_on_seq_len and not torch.compiler.is_compiling():
            # as transformers does; a plan (max_seqlen=...) avoids this host sync
            seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
        ra = rope_tables(rope, q.device, seq_len)
    check_rope_heads(ra, q.shape[1], k.shape[1])
    rot, inter = (ra[1], ra[2]) if ra else (0, False)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    lists, blocks = [], []
    if torch.compiler.is_compiling():
        # dispatch's memo takes a lock Dynamo cannot trace, and lowering reads the boundaries
        # on the host: the op resolves the backend and lowers inside (or pass a plan)
        backend_name = backend or ""
    else:
        key = _op.key_of(q, k, rot, inter, causal, -1 if window is None else window, num_anchors, qk_precision,
                         pm[0])
        kernel, config = dispatch.select("anchor_attention", key, backend=backend,
                                         device_index=q.device.index)
        backend_name = kernel.backend
        check_boundary_values(T, cu_seqlens, cu_rows, num_anchors)
        if kernel.fn.uses_lists:
            # lower once; with the backward's block sizes equal to the forward's, the same lists
            # (with their transpose) serve the backward from the autograd context
            bm, bn = config["BLOCK_M"], config["BLOCK_N"]
            same = (config.get("BWD_BLOCK_M", bm), config.get("BWD_BLOCK_N", bn)) == (bm, bn)
            fwd = lower(spec, cu_seqlens, cu_rows, T, bm, bn, transpose=same and needs_grad(q, k, v))
            lists, blocks = _op.pack(fwd), [bm, bn]
    positions, inv_freq, pairs = (positions.contiguous(), ra[0], ra[4]) if ra else (None, None, (None,) * 3)
    if q.__class__ is not torch.Tensor:
        # DTensor q/k/v: the boundaries, lists and rope tables enter the op as replicated DTensors
        # (the sharding rule in posattn.distributed.dtensor sees every placement; no user wrapping)
        from posattn.rope.custom_ops import replicate_like

        cu_seqlens, cu_rows, positions, inv_freq, *rest = replicate_like(q, cu_seqlens, cu_rows, positions, inv_freq,
                                                                         *pairs, *lists)
        pairs, lists = tuple(rest[:3]), list(rest[3:])
        if pm[3] is not None:                       # VistaRoPE's visual flags
            pm = (*pm[:3], replicate_like(q, pm[3])[0])
    out, lse, _table = _op.anchor_attention_op(
        q, k, v, cu_seqlens, cu_rows, lists, blocks, spec.num_anchors, spec.causal, -1 if window is None else window,
        softmax_scale, positions, inv_freq, rot, inter, ra[3] if ra else 1.0, backend_name, qk_precision, *pairs,
        *pm)
    return (out, lse) if return_lse else out

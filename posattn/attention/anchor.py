"""anchor_attention: the public op, its torch.library registration and its kernels' registry lines."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.attention.masks import MaskSpec, lower
from posattn.kernels.reference import attention as ref_attn
from posattn.lowered import RopeTables, token_bucket

MAX_HEAD_DIM = 256
_POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttnKey:
    """What the choice of kernel and launch config depends on."""

    device_type: str
    dtype: str
    head_dim: int
    heads_q: int
    heads_k: int
    rotary_dim: int
    interleaved: bool
    causal: bool
    windowed: bool
    anchors: bool
    tokens_bucket: int



def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


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


def _rope_inputs(rope, positions, q: torch.Tensor):
    """(positions, inv_freq, rotary_dim, interleaved, scaling) or None."""
    from posattn.rope.spec import RopeSpec

    T, _, D = q.shape
    if rope is None:
        if positions is not None:
            raise ValueError("positions were given without rope: pass rope=RopeSpec(...) to rotate q and k, "
                             "or drop positions")
        return None
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a posattn.RopeSpec or None, got {type(rope).__name__}")
    if rope.head_dim != D:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal q's head_dim ({D})")
    if positions is None:
        raise ValueError("positions [T] are required with rope")
    V.tensor(positions, "positions")
    if positions.dtype not in _POS_DTYPES:
        raise TypeError(f"positions must be int32, int64, float32 or float64; got {positions.dtype}")
    if positions.dim() != 1 or positions.shape[0] != T:
        raise ValueError(f"positions must be [T] = [{T}] (one per packed token); got shape {tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device} but q is on {q.device}; "
                         f"all tensors must be on one device")
    seq_len = None
    if rope.depends_on_seq_len:
        if torch.compiler.is_compiling():
            raise ValueError("rope: a scaling whose tables depend on the sequence length (DynamicNTK, LongRoPE) "
                             "cannot be traced by torch.compile here; use a fixed scaling")
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 1   # as transformers does
    if torch.compiler.is_compiling():
        # tables() keeps a locked cache that Dynamo cannot trace; build the same table in the graph
        tables = RopeTables(rope.inv_freq(None).to(q.device), rope.attention_scaling)
    else:
        tables = rope.tables(q.device, seq_len)
    if tables.inv_freq.dim() != 1 or tables.pair_axis is not None or tables.pair_pos_scale is not None:
        raise ValueError("rope: anchor_attention supports one inv_freq table [R/2] (no per-head frequencies, "
                         "mrope_section or dpe) yet")
    return (positions.contiguous(), tables.inv_freq.to(torch.float32).contiguous(), rope.rotary_dim,
            rope.interleaved, float(tables.attention_scaling))


# ---------------------------------------------------------------------------
# the public op


def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     cu_rows: torch.Tensor | None = None, num_anchors: int = 1, causal: bool = True,
                     window: int | None = None, softmax_scale: float | None = None, rope=None,
                     positions: torch.Tensor | None = None, return_lse: bool = False,
                     backend: str | None = None):
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
        rope: a :class:`posattn.RopeSpec`; q and k are rotated by ``positions`` inside the kernel
            (the same as ``apply_rope`` then attention, without the extra pass over memory).
        positions: [T] int or float positions, required with ``rope``.
        return_lse: also return the log-sum-exp.
        backend: force "triton", "cpu" (C++) or "reference".

    Returns:
        out [T, Hq, D] in q's dtype, and with ``return_lse`` the fp32 log-sum-exp [Hq, T].
        Differentiable in q, k and v.
    """
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
    _check_boundaries(cu_seqlens, "cu_seqlens", q.device)
    if cu_rows is None:
        cu_rows = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    else:
        _check_boundaries(cu_rows, "cu_rows", q.device)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=window)   # validates the three
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    V.boolean(return_lse, "return_lse")
    ra = _rope_inputs(rope, positions, q)

    key = AttnKey(q.device.type, _dtype_name(q.dtype), D, HQ, HK, ra[2] if ra else 0, ra[3] if ra else False,
                  causal, window is not None, num_anchors > 0, token_bucket(T))
    if torch.compiler.is_compiling():
        # dispatch's memo takes a lock Dynamo cannot trace: the op resolves the backend itself
        backend_name = backend or ""
    else:
        backend_name = dispatch.select("anchor_attention", key, backend=backend)[0].backend
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = torch.ops.posattn.anchor_attention(
        q, k, v, cu_seqlens, cu_rows, spec.num_anchors, spec.causal, -1 if window is None else window,
        float(softmax_scale), ra[0] if ra else None, ra[1] if ra else None, ra[2] if ra else 0,
        ra[3] if ra else False, ra[4] if ra else 1.0, backend_name)
    return (out, lse) if return_lse else out


def _key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors) -> AttnKey:
    T, HQ, D = q.shape
    return AttnKey(q.device.type, _dtype_name(q.dtype), D, HQ, k.shape[1], rotary_dim, interleaved,
                   causal, window >= 0, num_anchors > 0, token_bucket(T))


def _unpack(positions, inv_freq, rotary_dim, interleaved, rope_scaling):
    if positions is None:
        return None
    return positions, inv_freq, rotary_dim, interleaved, rope_scaling


@torch.library.custom_op("posattn::anchor_attention", mutates_args=())
def _anchor_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         cu_rows: torch.Tensor, num_anchors: int, causal: bool, window: int,
                         softmax_scale: float, positions: torch.Tensor | None, inv_freq: torch.Tensor | None,
                         rotary_dim: int, interleaved: bool, rope_scaling: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_boundary_values(q.shape[0], cu_seqlens, cu_rows, num_anchors)
    key = _key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors)
    kernel, config = dispatch.select("anchor_attention", key, backend=backend or None)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=None if window < 0 else window)
    rope = _unpack(positions, inv_freq, rotary_dim, interleaved, rope_scaling)
    return kernel.fn(q, k, v, cu_seqlens, cu_rows, spec, softmax_scale, rope, config)


@_anchor_attention_op.register_fake
def _(q, k, v, cu_seqlens, cu_rows, num_anchors, causal, window, softmax_scale, positions, inv_freq,
      rotary_dim, interleaved, rope_scaling, backend):
    T, HQ, _ = q.shape
    return torch.empty_like(q), q.new_empty((HQ, T), dtype=torch.float32)


@torch.library.custom_op("posattn::anchor_attention_backward", mutates_args=())
def _anchor_attention_bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                             cu_rows: torch.Tensor, num_anchors: int, causal: bool, window: int,
                             softmax_scale: float, positions: torch.Tensor | None, inv_freq: torch.Tensor | None,
                             rotary_dim: int, interleaved: bool, rope_scaling: float,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = _key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors)
    kernel, config = dispatch.select("anchor_attention", key, backend=backend or None)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=None if window < 0 else window)
    rope = _unpack(positions, inv_freq, rotary_dim, interleaved, rope_scaling)
    return kernel.fn.backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, spec, softmax_scale, rope,
                              config)


@_anchor_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, num_anchors, causal, window, softmax_scale,
      positions, inv_freq, rotary_dim, interleaved, rope_scaling, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, cu_rows, num_anchors, causal, window, softmax_scale, positions, inv_freq,
     rotary_dim, interleaved, rope_scaling, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_rows, positions, inv_freq)
    ctx.args = (num_anchors, causal, window, softmax_scale, rotary_dim, interleaved, rope_scaling, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, cu_rows, positions, inv_freq = ctx.saved_tensors
    num_anchors, causal, window, softmax_scale, rotary_dim, interleaved, rope_scaling, backend = ctx.args
    dq, dk, dv = _anchor_attention_bwd_op(dout.contiguous(), dlse, q, k, v, out, lse, cu_seqlens, cu_rows,
                                          num_anchors, causal, window, softmax_scale, positions, inv_freq,
                                          rotary_dim, interleaved, rope_scaling, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_anchor_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# backends


def _triton_forward(q, k, v, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    from posattn.kernels.triton import flash_attn as fa

    lists = lower(spec, cu_seqlens, cu_rows, q.shape[0], config["BLOCK_M"], config["BLOCK_N"], transpose=False)
    return fa.attn_forward(q, k, v, lists, spec.num_anchors, spec.causal, spec.window, softmax_scale, rope,
                           config)


def _triton_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    from posattn.kernels.triton import flash_attn as fa

    lists = lower(spec, cu_seqlens, cu_rows, q.shape[0], config["BWD_BLOCK_M"], config["BWD_BLOCK_N"])
    return fa.attn_backward(dout, q, k, v, out, lse, lists, spec.num_anchors, spec.causal, spec.window,
                            softmax_scale, rope, config, dlse=dlse)


_triton_forward.backward = _triton_backward


def _cpu_forward(q, k, v, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    from posattn.kernels import cpu_attention as ca

    lists = lower(spec, cu_seqlens, cu_rows, q.shape[0], config["BLOCK_M"], config["BLOCK_N"], transpose=False)
    return ca.attn_forward(q, k, v, lists, spec.num_anchors, spec.causal, spec.window, softmax_scale, rope, config)


def _cpu_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    from posattn.kernels import cpu_attention as ca

    lists = lower(spec, cu_seqlens, cu_rows, q.shape[0], config["BLOCK_M"], config["BLOCK_N"])
    return ca.attn_backward(dout, q, k, v, out, lse, lists, spec.num_anchors, spec.causal, spec.window,
                            softmax_scale, rope, config, dlse=dlse)


_cpu_forward.backward = _cpu_backward


def _cpu_supports(key: AttnKey):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    if key.dtype not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {key.dtype}: the C++ kernel computes in fp32 (float64 runs on the reference)"
    return True, ""


def _reference_forward(q, k, v, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    out, lse = ref_attn.anchor_attention(q, k, v, cu_seqlens, cu_rows, spec.num_anchors, spec.causal,
                                         spec.window, softmax_scale, rope)
    # outputs take q's strides, as the Triton kernel's and the fake implementation's do
    return torch.empty_like(q).copy_(out), lse.to(torch.float32).contiguous()


def _reference_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, spec, softmax_scale, rope, config):
    dq, dk, dv = ref_attn.anchor_attention_backward(dout, dlse, q, k, v, cu_seqlens, cu_rows, spec.num_anchors,
                                                    spec.causal, spec.window, softmax_scale, rope)
    return torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


_reference_forward.backward = _reference_backward


def _reference_supports(key: AttnKey):
    return True, ""


@dispatch.explicit_aware
def _triton_supports(key: AttnKey, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {key.dtype} is not compiled for Triton (float16, bfloat16, float32)"
    if key.head_dim > MAX_HEAD_DIM:
        return False, f"head_dim {key.head_dim} > {MAX_HEAD_DIM}"
    return True, ""


def _triton_default(key: AttnKey) -> dict:
    from posattn.kernels import triton as tk
    from posattn.kernels.triton import flash_attn as fa

    smem = None
    if key.device_type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        smem = getattr(props, "shared_memory_per_block_optin", None)   # None: sized for an H100
    return fa.default_config(key.head_dim, getattr(torch, key.dtype), interpret=key.device_type == "cpu"
                             and tk.interpreting(), smem_per_block=smem)


dispatch.register("anchor_attention", "reference", supports=_reference_supports,
                  dtypes=("float32", "float16", "bfloat16", "float64"))(_reference_forward)
dispatch.register("anchor_attention", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"BLOCK_M": 32, "BLOCK_N": 64, "threads": 0})(_cpu_forward)
dispatch.register("anchor_attention", "triton", supports=_triton_supports,
                  default_config=_triton_default)(_triton_forward)

"""apply_rope: the public op, its kernel key, and the kernel registrations."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.kernels import cpu as cpu_kernels
from posattn.kernels import cuda as cuda_kernels
from posattn.kernels.reference import rope as ref_kernels
from posattn.rope.spec import RopeSpec

LAYOUTS = ("bshd", "bhsd", "thd")


@dataclass(frozen=True)
class RopeKey:
    """What the choice of kernel and launch config depends on."""

    device_type: str
    dtype: str
    head_dim: int
    rotary_dim: int
    interleaved: bool
    heads_q: int
    heads_k: int
    pos_dtype: str
    tokens_bucket: int  # next power of two of B*S (autotune shape bucket)


def _bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x
    if layout == "bhsd":
        return x.transpose(1, 2)
    return x.unsqueeze(0)  # thd -> [1, T, H, D]


def _check_qk(q, k, layout):
    want = 3 if layout == "thd" else 4
    if q.dim() != want:
        raise ValueError(f"q must be {want}-D for layout={layout!r} "
                         f"({'[T, H, D]' if want == 3 else '[B, S, H, D]' if layout == 'bshd' else '[B, H, S, D]'}); "
                         f"got shape {tuple(q.shape)}")
    if k is not None:
        if k.dim() != want:
            raise ValueError(f"k must be {want}-D like q for layout={layout!r}; got shape {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
        qs, ks = _as_bshd(q, layout).shape, _as_bshd(k, layout).shape
        for i, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if qs[i] != ks[i]:
                raise ValueError(f"k's {what} ({ks[i]}) must equal q's ({qs[i]}); "
                                 f"q shape {tuple(q.shape)}, k shape {tuple(k.shape)} (layout={layout!r})")


def _positions_2d(positions: torch.Tensor, B: int, S: int, layout: str) -> torch.Tensor:
    if layout == "thd":
        if positions.dim() != 1 or positions.shape[0] != S:
            raise ValueError(f"positions must be [T] = [{S}] for layout='thd'; got shape {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 1:
        if positions.shape[0] != S:
            raise ValueError(f"positions of shape [S] must have S = {S} (q's sequence length); "
                             f"got {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 2:
        if tuple(positions.shape) != (B, S) and tuple(positions.shape) != (1, S):
            raise ValueError(f"positions of shape [B, S] must be [{B}, {S}] (or [1, {S}]); "
                             f"got {tuple(positions.shape)}")
        return positions
    raise ValueError(f"positions must be [S] or [B, S] (or [T] for layout='thd'); "
                     f"got {positions.dim()}-D shape {tuple(positions.shape)}")


def apply_rope(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, spec: RopeSpec, *,
               layout: str = "bshd", inplace: bool = False, backend: str | None = None):
    """Rotate q and k by their positions.

    Args:
        q: [B, S, Hq, D] (layout "bshd"), [B, Hq, S, D] ("bhsd") or packed [T, Hq, D] ("thd").
        k: the same layout with Hk heads, or None.
        positions: int32/int64 [S] (shared by the batch), [B, S], or [T] for "thd".
        spec: a :class:`RopeSpec` whose head_dim equals D.
        layout: "bshd", "bhsd" or "thd".
        inplace: write into q and k (and return them).
        backend: force "cuda", "triton", "cpu" or "reference".

    Returns:
        (q_out, k_out) in the input dtype and layout; k_out is None when k is None.
        Angles are computed in fp32 or better (fp64 range reduction); outputs are
        rounded once.
    """
    V.float_tensor(q, "q")
    if k is not None:
        V.float_tensor(k, "k")
    V.int_tensor(positions, "positions")
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a posattn.RopeSpec, got {type(spec).__name__}")
    V.choice(layout, "layout", LAYOUTS)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    _check_qk(q, k, layout)
    V.same_device(q, "q", k=k, positions=positions)
    q4 = _as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    if D != spec.head_dim:
        raise ValueError(f"q's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    pos2 = _positions_2d(positions, B, S, layout)
    k4 = _as_bshd(k, layout) if k is not None else None

    key = RopeKey(q.device.type, str(q.dtype).removeprefix("torch."), D, spec.rotary_dim,
                  spec.interleaved, HQ, k4.shape[2] if k4 is not None else 0,
                  str(positions.dtype).removeprefix("torch."), _bucket(B * S))
    kernel, config = dispatch.select("rope", key, backend=backend)

    q_out, qi, qo = _prepare(q, q4, layout, inplace)
    if k is not None:
        k_out, ki, ko = _prepare(k, k4, layout, inplace)
    else:
        k_out = ki = ko = None
    if pos2.stride(-1) != 1:
        pos2 = pos2.contiguous()
    inv_freq = spec.inv_freq_on(q.device)
    kernel.fn(qi, qo, ki, ko, pos2, inv_freq, spec.rotary_dim, spec.interleaved, config)
    if inplace:
        if qo.data_ptr() != qi.data_ptr():
            q4.copy_(qo)
        if k is not None and ko.data_ptr() != ki.data_ptr():
            k4.copy_(ko)
    return q_out, k_out


def _prepare(x, x4, layout, inplace):
    """Returns (tensor to return, [B,S,H,D] kernel input, [B,S,H,D] kernel output)."""
    xi = x4 if x4.stride(-1) == 1 else x4.contiguous()
    if inplace:
        if xi.data_ptr() == x4.data_ptr():
            return x, xi, xi
        return x, xi, xi  # rotated in the contiguous copy, then copied back by the caller
    out = torch.empty_like(x)
    out4 = _as_bshd(out, layout)
    if out4.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out4 = _as_bshd(out, layout)
    return out, xi, out4


# ---------------------------------------------------------------------------
# kernel registrations: one line per backend

def _dtype_ok(key: RopeKey, allowed=("float32", "float16", "bfloat16", "float64")):
    return key.dtype in allowed


def _cpu_supports(key: RopeKey):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    return (True, "") if _dtype_ok(key) else (False, f"dtype {key.dtype}")


def _cuda_supports(key: RopeKey):
    if key.device_type != "cuda":
        return False, f"needs CUDA tensors, got {key.device_type}"
    return (True, "") if _dtype_ok(key) else (False, f"dtype {key.dtype}")


@dispatch.explicit_aware
def _triton_supports(key: RopeKey, explicit: bool = False):
    from posattn.kernels import triton as tk

    if not tk.device_ok(key.device_type):
        return False, f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {key.device_type}"
    if key.device_type == "cpu" and not explicit:
        return False, "the Triton interpreter is only used on CPU tensors when asked for by name"
    if key.dtype == "float64":
        return False, "float64 is not compiled for Triton"
    return True, ""


def _triton_fn(*args):
    from posattn.kernels.triton import rope as tr

    return tr.rope_forward(*args)


def _triton_default(key: RopeKey):
    from posattn.kernels.triton import rope as tr

    return tr.default_config(key.head_dim, key.rotary_dim, max(key.heads_q, key.heads_k))


dispatch.register("rope", "reference", dtypes=("float32", "float16", "bfloat16", "float64"))(ref_kernels.rope_forward)
dispatch.register("rope", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cpu_kernels.rope_search_space)(cpu_kernels.rope_forward)
dispatch.register("rope", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 256},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cuda_kernels.rope_search_space)(cuda_kernels.rope_forward)
dispatch.register("rope", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=lambda key: __import__("posattn.kernels.triton.rope", fromlist=["_"])
                  .rope_search_space(key))(_triton_fn)

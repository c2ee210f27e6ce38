"""apply_rope, apply_rope_angles, rope_shift: the public ops, their kernel keys,
the torch.library custom ops they run through (autograd, torch.compile), and
the kernel registrations.

Every kernel sees only lowered data (posattn.lowered.RopeTables, or an
explicit angles tensor) and [B, S, H, D] views whose last dimension is
contiguous; see posattn/kernels/cpu.py for the contract.

Autograd: ``posattn::rope`` and ``posattn::rope_angles`` are torch.library
custom ops with fake (meta) implementations and registered backwards, so they
differentiate on every backend and trace under ``torch.compile(fullgraph=True)``.
The backward of a rotation by theta is the same kernel at -theta (sign=-1),
with the DPE query offset applied to the query gradient as in the forward. The
gradient of apply_rope_angles with respect to the angle of pair p is
``sign * sum_heads (x1 * gx2 - x2 * gx1)`` with gx the input gradient.

``inplace=True`` runs the kernel in place (``posattn::rope_``, a mutating
custom op) when no gradient is needed. When q or k requires grad it is done
like torch's own in-place ops: the rotation is computed out of place and
copied into q / k through autograd, so a leaf that requires grad raises
torch's usual in-place error and non-leaf tensors get correct gradients.

Hot path: eager calls that need no gradient skip the custom-op dispatcher, and
apply_rope keeps a per-signature *plan* (see "the hot path" below): a repeated
signature costs a dict lookup, the output allocation and the kernel call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posattn import _validate as V
from posattn import _plans, dispatch
from posattn.kernels import cpu as cpu_kernels
from posattn.kernels import cuda as cuda_kernels
from posattn.kernels.reference import rope as ref_kernels
from posattn.lowered import RopeTables, token_bucket
from posattn.rope.spec import RopeSpec

LAYOUTS = ("bshd", "bhsd", "thd")
POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


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
    pos_dtype: str      # "int32" | "int64" | "float32" | "float64" | "angles"
    tokens_bucket: int  # next power of two of B*S (autotune shape bucket)
    n_axes: int = 1     # position axes read through pair_axis (multi-axis sections)
    rows: int = 1       # per-head inv_freq / angle rows (1: shared by all heads)
    dpe: bool = False   # dimension-wise positions (pair_pos_scale)



_DNAMES: dict = {}


def _dname(dt: torch.dtype) -> str:
    n = _DNAMES.get(dt)
    if n is None:
        n = _DNAMES[dt] = str(dt).removeprefix("torch.")
    return n


def _as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x
    if layout == "bhsd":
        return x.transpose(1, 2)
    return x.unsqueeze(0)  # thd -> [1, T, H, D]


def _from_bshd(x4: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x4
    if layout == "bhsd":
        return x4.transpose(1, 2)
    return x4.squeeze(0)


def _check_x(x, name, layout):
    want = 3 if layout == "thd" else 4
    if x.dim() != want:
        shape = "[T, H, D]" if want == 3 else "[B, S, H, D]" if layout == "bshd" else "[B, H, S, D]"
        raise ValueError(f"{name} must be {want}-D for layout={layout!r} ({shape}); "
                         f"got shape {tuple(x.shape)}")


def _check_qk(q, k, layout):
    _check_x(q, "q", layout)
    if k is not None:
        if k.dim() != q.dim():
            raise ValueError(f"k must be {q.dim()}-D like q for layout={layout!r}; got shape {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
        qs, ks = _as_bshd(q, layout).shape, _as_bshd(k, layout).shape
        for i, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if qs[i] != ks[i]:
                raise ValueError(f"k's {what} ({ks[i]}) must equal q's ({qs[i]}); "
                                 f"q shape {tuple(q.shape)}, k shape {tuple(k.shape)} (layout={layout!r})")


def _positions_3d(positions: torch.Tensor, B: int, S: int, layout: str, n_axes: int,
                  name: str = "positions") -> torch.Tensor:
    """Positions as an [A, Bp, S] view (Bp in {1, B}), or a ValueError naming the argument."""
    if n_axes > 1:
        forms = "[n_axes, T]" if layout == "thd" else "[n_axes, S] or [n_axes, B, S]"
        if positions.dim() < 1 or positions.shape[0] != n_axes:
            raise ValueError(f"{name} must be {forms} with n_axes = {n_axes} (the spec has multi-axis "
                             f"sections); got shape {tuple(positions.shape)}")
        _positions_2d(positions[0], B, S, layout, name, prefix="[n_axes] + ")
        return positions.unsqueeze(1) if positions.dim() == 2 else positions
    return _positions_2d(positions, B, S, layout, name).unsqueeze(0)


def _positions_2d(positions, B, S, layout, name, prefix=""):
    if layout == "thd":
        if positions.dim() != 1 or positions.shape[0] != S:
            raise ValueError(f"{name} must be {prefix}[T] = [{S}] for layout='thd'; "
                             f"got shape {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 1:
        if positions.shape[0] != S:
            raise ValueError(f"{name} of shape {prefix}[S] must have S = {S} (q's sequence length); "
                             f"got {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 2:
        if tuple(positions.shape) != (B, S) and tuple(positions.shape) != (1, S):
            raise ValueError(f"{name} of shape {prefix}[B, S] must be [{B}, {S}] (or [1, {S}]); "
                             f"got {tuple(positions.shape)}")
        return positions
    raise ValueError(f"{name} must be {prefix}[S] or {prefix}[B, S] (or {prefix}[T] for layout='thd'); "
                     f"got {positions.dim()}-D shape {tuple(positions.shape)}")


def _pos_tensor(positions, name="positions"):
    V.tensor(positions, name)
    if positions.dtype not in POS_DTYPES:
        raise TypeError(f"{name} must be int32, int64, float32 or float64; got {positions.dtype}")
    return positions


def _tables_for(spec: RopeSpec, device, positions, seq_len):
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    if getattr(spec, "depends_on_seq_len", False) and seq_len is None:
        if positions is None:
            raise ValueError("this spec's tables depend on the sequence length: pass seq_len= "
                             "(or positions) so the right tables are used")
        # one host sync; pass seq_len= to avoid it
        seq_len = int(positions.max().item()) + 1 if positions.numel() else 1
    return spec.tables(device, seq_len)


def _check_rows(tables: RopeTables, HQ: int, HK: int):
    inv = tables.inv_freq
    rows = 1 if inv.dim() == 1 else inv.shape[0]
    for name, h in (("q", HQ), ("k", HK)):
        if h and h % rows:
            raise ValueError(f"the spec's per-head inv_freq has {rows} rows, which must divide {name}'s "
                             f"head count ({h}); head h uses row h // (heads // rows)")
    return rows


def _pos_key_dtype(pos3):
    return _dname(pos3.dtype)


def _make_key(x4: torch.Tensor, HQ: int, HK: int, rotary_dim: int, interleaved: bool, pos_dtype: str,
              n_axes: int, rows: int, dpe: bool) -> RopeKey:
    B, S, _, D = x4.shape
    return RopeKey(x4.device.type, _dname(x4.dtype), D, rotary_dim, interleaved, HQ, HK, pos_dtype,
                   token_bucket(B * S), n_axes, rows, dpe)


def _new_like(x4: torch.Tensor) -> torch.Tensor:
    # same strides as the input when it is dense (so a bhsd input gives a bhsd output)
    out = torch.empty_like(x4)
    return out if out.stride(-1) == 1 else torch.empty(x4.shape, dtype=x4.dtype, device=x4.device)


def _last_contig(x4: torch.Tensor) -> torch.Tensor:
    return x4 if x4.stride(-1) == 1 or x4.shape[-1] == 1 else x4.contiguous()


def _select(op: str, key: RopeKey, backend: str):
    return dispatch.select(op, key, backend=backend or None)


# ---------------------------------------------------------------------------
# custom ops: positions x tables

def _tables_from(inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling, n_axes):
    return RopeTables(inv_freq, attention_scaling, pair_axis, n_axes, pair_pos_scale, pair_q_offset)


def _run_rope(q, qo, k, ko, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
              attention_scaling, rotary_dim, interleaved, sign, backend):
    tables = _tables_from(inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling,
                          pos3.shape[0])
    rows = 1 if inv_freq.dim() == 1 else inv_freq.shape[0]
    x = q if q.shape[2] else k
    key = _make_key(x, q.shape[2], k.shape[2], rotary_dim, interleaved, _pos_key_dtype(pos3),
                    pos3.shape[0], rows, pair_pos_scale is not None)
    kernel, config = _select("rope", key, backend)
    kernel.fn(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config)


@torch.library.custom_op("posattn::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, pos3: torch.Tensor, inv_freq: torch.Tensor,
             pair_axis: Optional[torch.Tensor], pair_pos_scale: Optional[torch.Tensor],
             pair_q_offset: Optional[torch.Tensor], attention_scaling: float, rotary_dim: int,
             interleaved: bool, sign: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S, Hq, D], k: [B, S, Hk, D] (Hk may be 0), pos3: [A, Bp, S] -> rotated copies."""
    qo, ko = _new_like(q), _new_like(k)
    _run_rope(q, qo, k, ko, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
              attention_scaling, rotary_dim, interleaved, sign, backend)
    return qo, ko


@_rope_op.register_fake
def _rope_fake(q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling,
               rotary_dim, interleaved, sign, backend):
    return _new_like(q), _new_like(k)


def _rope_setup(ctx, inputs, output):
    (q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling, rotary_dim,
     interleaved, sign, backend) = inputs
    ctx.save_for_backward(pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset)
    ctx.attrs = (attention_scaling, rotary_dim, interleaved, sign, backend)
    ctx.shapes = (q, k)


def _grad_in(g, like):
    if g is None:
        return torch.zeros_like(like)
    return _last_contig(g)


def _rope_backward(ctx, gq, gk):
    pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset = ctx.saved_tensors
    attention_scaling, rotary_dim, interleaved, sign, backend = ctx.attrs
    q, k = ctx.shapes
    dq, dk = _rope_op(_grad_in(gq, q), _grad_in(gk, k), pos3, inv_freq, pair_axis, pair_pos_scale,
                      pair_q_offset, attention_scaling, rotary_dim, interleaved, -sign, backend)
    return dq, dk, None, None, None, None, None, None, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("posattn::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, pos3: torch.Tensor, inv_freq: torch.Tensor,
                     pair_axis: Optional[torch.Tensor], pair_pos_scale: Optional[torch.Tensor],
                     pair_q_offset: Optional[torch.Tensor], attention_scaling: float, rotary_dim: int,
                     interleaved: bool, sign: float, backend: str) -> None:
    """In-place posattn::rope (q, k last-dim contiguous [B, S, H, D] tensors)."""
    _run_rope(q, q, k, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
              attention_scaling, rotary_dim, interleaved, sign, backend)


@_rope_inplace_op.register_fake
def _rope_inplace_fake(q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
                       attention_scaling, rotary_dim, interleaved, sign, backend):
    return None


# ---------------------------------------------------------------------------
# custom ops: explicit angles

def _run_angles(q, qo, k, ko, angles, rotary_dim, interleaved, sign, backend):
    x = q if q.shape[2] else k
    key = _make_key(x, q.shape[2], k.shape[2], rotary_dim, interleaved, "angles", 1, angles.shape[2], False)
    kernel, config = _select("rope_angles", key, backend)
    if kernel.backend != "reference" and angles.dtype != torch.float32:
        angles = angles.float()
    kernel.fn(q, qo, k, ko, _last_contig(angles), rotary_dim, interleaved, sign, config)


@torch.library.custom_op("posattn::rope_angles", mutates_args=())
def _rope_angles_op(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, rotary_dim: int,
                    interleaved: bool, sign: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S, Hq, D], k: [B, S, Hk, D], angles: [Ba, S, Ha, R/2] -> rotated copies."""
    qo, ko = _new_like(q), _new_like(k)
    _run_angles(q, qo, k, ko, angles, rotary_dim, interleaved, sign, backend)
    return qo, ko


@_rope_angles_op.register_fake
def _rope_angles_fake(q, k, angles, rotary_dim, interleaved, sign, backend):
    return _new_like(q), _new_like(k)


def _angles_setup(ctx, inputs, output):
    q, k, angles, rotary_dim, interleaved, sign, backend = inputs
    ctx.save_for_backward(q, k, angles)
    ctx.attrs = (rotary_dim, interleaved, sign, backend)


def _pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool):
    rot = x[..., :rotary_dim]
    if interleaved:
        return rot[..., 0::2], rot[..., 1::2]
    return rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]


def _angle_grad(x, gx, rows, rotary_dim, interleaved):
    """sum over the heads sharing a row of x1 * gx2 - x2 * gx1 -> [B, S, rows, R/2] (fp32 or fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = _pairs(x.to(acc), rotary_dim, interleaved)
    g1, g2 = _pairs(gx.to(acc), rotary_dim, interleaved)
    t = x1 * g2 - x2 * g1
    B, S, H, P = t.shape
    return t.reshape(B, S, rows, H // rows, P).sum(3)


def _angles_backward(ctx, gq, gk):
    q, k, angles = ctx.saved_tensors
    rotary_dim, interleaved, sign, backend = ctx.attrs
    dq, dk = _rope_angles_op(_grad_in(gq, q), _grad_in(gk, k), angles, rotary_dim, interleaved, -sign, backend)
    dang = None
    if ctx.needs_input_grad[2]:
        rows = angles.shape[2]
        dang = _angle_grad(q, dq, rows, rotary_dim, interleaved) if q.shape[2] else 0
        if k.shape[2]:
            dang = dang + _angle_grad(k, dk, rows, rotary_dim, interleaved)
        dang = dang * sign
        if angles.shape[0] == 1 and dang.shape[0] != 1:
            dang = dang.sum(0, keepdim=True)
        dang = dang.to(angles.dtype)
    return dq, dk, dang, None, None, None, None


_rope_angles_op.register_autograd(_angles_backward, setup_context=_angles_setup)


@torch.library.custom_op("posattn::rope_angles_", mutates_args=("q", "k"))
def _rope_angles_inplace_op(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, rotary_dim: int,
                            interleaved: bool, sign: float, backend: str) -> None:
    _run_angles(q, q, k, k, angles, rotary_dim, interleaved, sign, backend)


@_rope_angles_inplace_op.register_fake
def _rope_angles_inplace_fake(q, k, angles, rotary_dim, interleaved, sign, backend):
    return None


# ---------------------------------------------------------------------------
# the public ops

def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _direct(op, q, k, q4, k4, data, rotary_dim, interleaved, sign, layout, inplace, key, backend):
    """Eager, no gradient needed: select and launch without the custom-op machinery
    (which costs ~100 us a call); ``data`` is (pos3, tables) or (angles,)."""
    kernel, config = dispatch.select(op, key, backend=backend)
    qi = _last_contig(q4)
    ki = _last_contig(k4) if k4 is not None else None
    if op == "rope_angles" and kernel.backend != "reference" and data[0].dtype != torch.float32:
        data = (data[0].float(),)
    if op == "rope_angles":
        data = (_last_contig(data[0]),)
    if inplace:
        kernel.fn(qi, qi, ki, ki, *data, rotary_dim, interleaved, sign, config)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4 = _new_like(qi)
    ko4 = _new_like(ki) if ki is not None else None
    kernel.fn(qi, qo4, ki, ko4, *data, rotary_dim, interleaved, sign, config)
    return _from_bshd(qo4, layout), (_from_bshd(ko4, layout) if k is not None else None)


# ---------------------------------------------------------------------------
# the hot path: per-signature plans (eager, no gradient)
#
# apply_rope's checks, its kernel key, the backend choice and the lowered tables
# depend only on the inputs' metadata (shapes, strides, dtypes, devices), the spec,
# the keyword arguments and the backend request (backend=, use_backend(), the
# POSATTN_BACKEND environment variable) -- never on tensor contents, except for
# specs whose tables depend on max(positions) (seq_len=None with DynamicNTK or
# LongRoPE), which are never planned. A plan stores the outcome for one such
# signature, so that a repeated call costs one dict lookup, the views and the
# output allocation before the kernel runs. Plans are made only after every
# check passed, so a bad input never finds one (its key has never been stored).
# dispatch.clear_memo() (autotune reloads, new registrations) drops them all.

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_ctx_backend = dispatch.context_backend
_env_backend = dispatch.env_backend_raw
_empty_like = torch.empty_like
_empty = torch.empty

PLAN_CACHE_SIZE = 512  # signatures kept; the cache is emptied when full (0: no plans)
_PLANS: dict = _plans.new_table()
_ANGLE_PLANS: dict = _plans.new_table()   # apply_rope_angles' plans (the same _RopePlan, tables None)
_SHIFT_PLANS: dict = _plans.new_table()   # rope_shift's plans (k in the query role)


def clear_plans() -> None:
    """Forget every apply_rope, apply_rope_angles and rope_shift plan (dispatch.clear_memo() does this too)."""
    _PLANS.clear()
    _ANGLE_PLANS.clear()
    _SHIFT_PLANS.clear()


def _scalar_positions(value: float, shape, device) -> torch.Tensor:
    """fp64 positions of ``shape`` [A, 1, S], all ``value`` (one element, expanded)."""
    return torch.full((1, 1, 1), value, dtype=torch.float64, device=device).expand(shape)


def _keeps_last_dim(x4: torch.Tensor) -> bool:
    """Whether empty_like(x4) is last-dim contiguous (what _new_like checks), without allocating."""
    return torch.empty_like(x4, device="meta").stride(-1) == 1


class _RopePlan:
    """What apply_rope (or apply_rope_angles) does for one checked signature (eager, no grad):
    see above. ``tables`` is None for apply_rope_angles, whose kernels take the angles instead."""

    __slots__ = ("kernel", "fn", "config", "tables", "pos_shape", "pos_last", "q_copy", "k_copy", "q_like",
                 "k_like", "rotary_dim", "interleaved", "layout", "inplace", "simple", "launch", "src_fix",
                 "scalar")

    def __init__(self, kernel, config, tables, pos_shape, q4, k4, rotary_dim, interleaved, layout,
                 inplace, src_fix=None, scalar=False):
        self.kernel, self.fn, self.config, self.tables = kernel, kernel.fn, config, tables
        self.pos_shape = pos_shape  # pos3 = positions.view(pos_shape): size-1 dims inserted
        # (positions, its data_ptr, its strides, its pos3 view) of the last call: a view costs
        # ~2 us, and a model passes the same positions tensor to every layer. The view is valid
        # while positions is the same object with the same storage, offset and strides (its
        # shape, dtype and device are in the plan's key); pos3 keeps the storage alive, so an
        # equal data_ptr cannot belong to new storage.
        self.pos_last = None
        # angles only: view -> what the kernel reads (fp32, last dim contiguous), the view
        # itself when it already is; a copy is made again on every call
        self.src_fix = src_fix
        # rope_shift's scalar delta: run() gets a Python float, every token at that position
        # (a prepared launcher takes it as is; the kernel function gets an expanded tensor)
        self.scalar = scalar
        self.q_copy = not (q4.stride(-1) == 1 or q4.shape[-1] == 1)   # as _last_contig
        self.k_copy = k4 is not None and not (k4.stride(-1) == 1 or k4.shape[-1] == 1)
        self.q_like = self.q_copy or _keeps_last_dim(q4)              # as _new_like
        self.k_like = k4 is None or self.k_copy or _keeps_last_dim(k4)
        self.rotary_dim, self.interleaved, self.layout, self.inplace = rotary_dim, interleaved, layout, inplace
        self.simple = (layout == "bshd" and not inplace and not self.q_copy and not self.k_copy
                       and self.q_like and self.k_like)
        # launch(qi, qo, ki, ko, pos3): the kernel prepared for this signature (Kernel.prepare)
        # on the first run, with that run's tensors; the tensors of every later run have the
        # same shapes, strides, dtypes and device (the plan's key and the rules above fix them)
        self.launch = None

    def _prepare(self, qi, qo, ki, ko, pos3):
        fn, tables, rd, inter, config = self.fn, self.tables, self.rotary_dim, self.interleaved, self.config
        data = () if tables is None else (tables,)  # kernel arguments after pos3 / the angles
        shape, scalar = self.pos_shape, self.scalar
        if self.kernel.prepare is not None:
            example = _scalar_positions(pos3, shape, qi.device) if scalar else pos3
            launch = self.kernel.prepare(qi, qo, ki, ko, example, *data, rd, inter, 1.0, config)
        else:
            def launch(qi, qo, ki, ko, pos3):
                if scalar:
                    pos3 = _scalar_positions(pos3, shape, qi.device)
                fn(qi, qo, ki, ko, pos3, *data, rd, inter, 1.0, config)
        self.launch = launch
        return launch

    def run(self, q, k, positions):
        last = self.pos_last
        if self.scalar:
            pos3 = positions
        elif (last is not None and last[0] is positions and last[1] == positions.data_ptr()
                and last[2] == positions.stride()):
            pos3 = last[3]
        else:
            pos3 = positions.view(self.pos_shape)
            fixed = pos3 if self.src_fix is None else self.src_fix(pos3)
            if fixed is pos3:
                self.pos_last = (positions, positions.data_ptr(), positions.stride(), pos3)  # one atomic store
            else:  # a copy: never kept (it would miss in-place changes of the source)
                pos3 = fixed
        if self.simple:  # bshd, out of place, last dims contiguous, empty_like keeps them so
            qo = _empty_like(q)
            ko = None if k is None else _empty_like(k)
            (self.launch or self._prepare(q, qo, k, ko, pos3))(q, qo, k, ko, pos3)
            return qo, ko
        layout = self.layout
        q4, k4 = _as_bshd(q, layout), (_as_bshd(k, layout) if k is not None else None)
        qi = q4.contiguous() if self.q_copy else q4
        ki = k4.contiguous() if self.k_copy else k4
        if self.inplace:
            (self.launch or self._prepare(qi, qi, ki, ki, pos3))(qi, qi, ki, ki, pos3)
            if self.q_copy:
                q4.copy_(qi)
            if self.k_copy:
                k4.copy_(ki)
            return q, k
        qo = _empty_like(qi) if self.q_like else _empty(qi.shape, dtype=qi.dtype, device=qi.device)
        if ki is None:
            ko = None
        else:
            ko = _empty_like(ki) if self.k_like else _empty(ki.shape, dtype=ki.dtype, device=ki.device)
        (self.launch or self._prepare(qi, qo, ki, ko, pos3))(qi, qo, ki, ko, pos3)
        if layout == "bshd":
            return qo, ko
        return _from_bshd(qo, layout), (_from_bshd(ko, layout) if ko is not None else None)


def _run_positions(q, k, q4, k4, pos3, tables, rotary_dim, interleaved, sign, layout, inplace,
                   key, backend):
    """Run posattn::rope / rope_ on [B, S, H, D] views (or the kernel directly, eagerly and
    without grad); returns outputs in layout."""
    if not _compiling() and not _needs_grad(q, k):
        return _direct("rope", q, k, q4, k4, (pos3, tables), rotary_dim, interleaved, sign, layout, inplace,
                       key, backend)
    if not _compiling():
        kernel, _ = dispatch.select("rope", key, backend=backend)
        backend = kernel.backend
    name = backend or ""
    kk4 = k4 if k4 is not None else q4.new_empty(q4.shape[0], q4.shape[1], 0, q4.shape[3])
    targs = (pos3, tables.inv_freq, tables.pair_axis, tables.pair_pos_scale, tables.pair_q_offset,
             float(tables.attention_scaling), rotary_dim, interleaved, float(sign), name)
    if inplace and not _needs_grad(q, k):
        qi, ki = _last_contig(q4), _last_contig(kk4)
        torch.ops.posattn.rope_(qi, ki, *targs)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4, ko4 = torch.ops.posattn.rope(_last_contig(q4), _last_contig(kk4), *targs)
    if inplace:  # through autograd, like torch's in-place ops
        q4.copy_(qo4)
        if k4 is not None:
            k4.copy_(ko4)
        return q, k
    return _from_bshd(qo4, layout), (_from_bshd(ko4, layout) if k is not None else None)


def apply_rope(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, spec: RopeSpec, *,
               layout: str = "bshd", inplace: bool = False, backend: str | None = None,
               seq_len: int | None = None):
    """Rotate q and k by their positions.

    Args:
        q: [B, S, Hq, D] (layout "bshd"), [B, Hq, S, D] ("bhsd") or packed [T, Hq, D] ("thd").
            Any strides whose last dimension is contiguous are read without a copy.
        k: the same layout with Hk heads, or None.
        positions: int32/int64/float32/float64 [S] (shared by the batch), [B, S], or [T] for
            "thd". Float positions give fractional rotations (V2PE). When the spec has
            multi-axis sections (mrope), [n_axes, S], [n_axes, B, S] or [n_axes, T]: each
            rotary pair reads the axis its section names.
        spec: a :class:`RopeSpec` whose head_dim equals D.
        layout: "bshd", "bhsd" or "thd".
        inplace: write into q and k (and return them). Without grad this runs the kernel in
            place; with grad it behaves like torch's in-place ops.
        backend: force "cuda", "triton", "cpu" or "reference".
        seq_len: for specs whose tables depend on the sequence length (dynamic NTK,
            LongRoPE): the length to build them for. Default: max(positions) + 1, which
            costs one device-to-host sync.

    Returns:
        (q_out, k_out) in the input dtype and layout; k_out is None when k is None.
        Angles are reduced modulo 2*pi exactly in fp64 before sin/cos; outputs are
        rounded once. Differentiable with respect to q and k on every backend.
    """
    if (not _is_compiling() and q.__class__ is _Tensor and positions.__class__ is _Tensor
            and spec.__class__ is RopeSpec and (k is None or k.__class__ is _Tensor)
            and not (_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)))
            and (inplace is False or inplace is True) and (seq_len is None or seq_len.__class__ is int)
            and layout.__class__ is str and (backend is None or backend.__class__ is str)):
        # hot path: a signature seen before (every check below passed for it) runs its plan
        if k is None:
            pk = (q.shape, q.stride(), q.dtype, q.device, None, positions.shape, positions.dtype,
                  positions.device, spec, layout, inplace, backend, seq_len, _ctx_backend(), _env_backend())
        else:
            pk = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
                  positions.shape, positions.dtype, positions.device, spec, layout, inplace, backend,
                  seq_len, _ctx_backend(), _env_backend())
        plan = _PLANS.get(pk)
        if plan is not None:
            return plan.run(q, k, positions)
        return _apply_rope_checked(q, k, positions, spec, layout, inplace, backend, seq_len, pk)
    return _apply_rope_checked(q, k, positions, spec, layout, inplace, backend, seq_len, None)


def _apply_rope_checked(q, k, positions, spec, layout, inplace, backend, seq_len, pk):
    """apply_rope with every check; stores a plan under ``pk`` (when not None) once they pass."""
    V.float_tensor(q, "q")
    if k is not None:
        V.float_tensor(k, "k")
    _pos_tensor(positions)
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a posattn.RopeSpec, got {type(spec).__name__}")
    V.choice(layout, "layout", LAYOUTS)
    V.boolean(inplace, "inplace")
    _check_qk(q, k, layout)
    V.same_device(q, "q", k=k, positions=positions)
    q4 = _as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    if D != spec.head_dim:
        raise ValueError(f"q's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    k4 = _as_bshd(k, layout) if k is not None else None
    HK = k4.shape[2] if k4 is not None else 0
    tables = _tables_for(spec, q.device, positions, seq_len)
    pos3 = _positions_3d(positions, B, S, layout, tables.n_axes)
    rows = _check_rows(tables, HQ, HK)
    key = _make_key(q4, HQ, HK, spec.rotary_dim, spec.interleaved, _dname(positions.dtype),
                    tables.n_axes, rows, tables.pair_pos_scale is not None)
    if pk is not None and not (seq_len is None and spec.depends_on_seq_len):
        # eager, no grad, plain tensors: everything checked above is fixed by pk (tables too,
        # unless they depend on the positions' values); the kernel choice is fixed until
        # dispatch.clear_memo(), which drops every plan
        kernel, config = dispatch.select("rope", key, backend=backend)
        plan = _RopePlan(kernel, config, tables, tuple(pos3.shape), q4, k4, spec.rotary_dim,
                         spec.interleaved, layout, inplace)
        _plans.store(_PLANS, pk, plan, PLAN_CACHE_SIZE)
        return plan.run(q, k, positions)
    return _run_positions(q, k, q4, k4, pos3, tables, spec.rotary_dim, spec.interleaved, 1.0, layout,
                          inplace, key, backend)


def apply_rope_angles(q: torch.Tensor, k: torch.Tensor | None, angles: torch.Tensor, *,
                      interleaved: bool = False, layout: str = "bshd", inplace: bool = False,
                      backend: str | None = None):
    """Rotate q and k by explicit angles (context-aware RoPE: a network produces the phases).

    Args:
        q, k: as for :func:`apply_rope` (k may be None).
        angles: float32 (or float64) [B, S, Ha, R/2] or [S, Ha, R/2] ([T, Ha, R/2] for
            "thd"), whatever the layout of q and k. R = 2 * angles.shape[-1] is the
            rotary dim (<= head_dim; the rest passes through). Ha is 1 (shared by all
            heads) or divides both head counts: head h of a tensor with H heads reads row
            h // (H // Ha) (Ha = Hk gives one phase per GQA group). Native backends read
            fp32 (fp64 angles are rounded); the reference keeps fp64.
        interleaved: pair (2p, 2p+1) instead of (p, p + R/2).

    Returns:
        (q_out, k_out). Differentiable with respect to q, k and angles.
    """
    if (not _is_compiling() and q.__class__ is _Tensor and angles.__class__ is _Tensor
            and (k is None or k.__class__ is _Tensor)
            and not (_grad_enabled() and (q.requires_grad or angles.requires_grad
                                          or (k is not None and k.requires_grad)))
            and (interleaved is False or interleaved is True) and (inplace is False or inplace is True)
            and layout.__class__ is str and (backend is None or backend.__class__ is str)):
        # hot path: a signature seen before runs its plan (as apply_rope)
        if k is None:
            pk = (q.shape, q.stride(), q.dtype, q.device, None, angles.shape, angles.dtype, angles.device,
                  interleaved, layout, inplace, backend, _ctx_backend(), _env_backend())
        else:
            pk = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
                  angles.shape, angles.dtype, angles.device, interleaved, layout, inplace, backend,
                  _ctx_backend(), _env_backend())
        plan = _ANGLE_PLANS.get(pk)
        if plan is not None:
            return plan.run(q, k, angles)
        return _apply_rope_angles_checked(q, k, angles, interleaved, layout, inplace, backend, pk)
    return _apply_rope_angles_checked(q, k, angles, interleaved, layout, inplace, backend, None)


def _angles_to_fp32(a4):
    return _last_contig(a4.float())


def _apply_rope_angles_checked(q, k, angles, interleaved, layout, inplace, backend, pk):
    """apply_rope_angles with every check; stores a plan under ``pk`` (when not None) once they pass."""
    V.float_tensor(q, "q")
    if k is not None:
        V.float_tensor(k, "k")
    V.tensor(angles, "angles")
    if angles.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"angles must be float32 (or float64); got {angles.dtype}")
    V.boolean(interleaved, "interleaved")
    V.choice(layout, "layout", LAYOUTS)
    V.boolean(inplace, "inplace")
    _check_qk(q, k, layout)
    V.same_device(q, "q", k=k, angles=angles)
    q4 = _as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    k4 = _as_bshd(k, layout) if k is not None else None
    HK = k4.shape[2] if k4 is not None else 0
    want = "[T, Ha, R/2]" if layout == "thd" else "[B, S, Ha, R/2] or [S, Ha, R/2]"
    ranks = (3,) if layout == "thd" else (3, 4)
    if angles.dim() not in ranks:
        raise ValueError(f"angles must be {want}; got {angles.dim()}-D shape {tuple(angles.shape)}")
    ang4 = angles.unsqueeze(0) if angles.dim() == 3 else angles
    if ang4.shape[1] != S or ang4.shape[0] not in (1, B):
        raise ValueError(f"angles must be {want} with S = {S}" + ("" if layout == "thd" else f", B = {B}")
                         + f"; got shape {tuple(angles.shape)}")
    rows, half = ang4.shape[2], ang4.shape[3]
    if half < 1 or 2 * half > D:
        raise ValueError(f"angles' last dimension (R/2 = {half}) must be in [1, head_dim/2 = {D // 2}]; "
                         f"got shape {tuple(angles.shape)}")
    if rows < 1 or any(h % rows for h in (HQ, HK) if h):
        raise ValueError(f"angles' head dimension ({rows}) must be 1 or divide q's ({HQ}) and k's "
                         f"({HK}) head counts; got shape {tuple(angles.shape)}")
    rotary_dim = 2 * half
    key = _make_key(q4, HQ, HK, rotary_dim, interleaved, "angles", 1, rows, False)
    if pk is not None:
        # eager, no grad, plain tensors: the checks above depend only on what pk holds
        kernel, config = dispatch.select("rope_angles", key, backend=backend)
        fix = _angles_to_fp32 if kernel.backend != "reference" and angles.dtype != torch.float32 else _last_contig
        plan = _RopePlan(kernel, config, None, tuple(ang4.shape), q4, k4, rotary_dim, interleaved, layout,
                         inplace, src_fix=fix)
        _plans.store(_ANGLE_PLANS, pk, plan, PLAN_CACHE_SIZE)
        return plan.run(q, k, angles)
    if not _compiling() and not _needs_grad(q, k, angles):
        return _direct("rope_angles", q, k, q4, k4, (ang4,), rotary_dim, interleaved, 1.0, layout, inplace,
                       key, backend)
    if not _compiling():
        kernel, _ = dispatch.select("rope_angles", key, backend=backend)
        backend = kernel.backend
    name = backend or ""
    kk4 = k4 if k4 is not None else q4.new_empty(B, S, 0, D)
    if inplace and not _needs_grad(q, k, angles):
        qi, ki = _last_contig(q4), _last_contig(kk4)
        torch.ops.posattn.rope_angles_(qi, ki, ang4, rotary_dim, interleaved, 1.0, name)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4, ko4 = torch.ops.posattn.rope_angles(_last_contig(q4), _last_contig(kk4), ang4, rotary_dim,
                                             interleaved, 1.0, name)
    if inplace:
        q4.copy_(qo4)
        if k4 is not None:
            k4.copy_(ko4)
        return q, k
    return _from_bshd(qo4, layout), (_from_bshd(ko4, layout) if k is not None else None)


def rope_shift(k: torch.Tensor, delta, spec: RopeSpec, positions: torch.Tensor | None = None, *,
               layout: str = "bshd", inplace: bool = False, backend: str | None = None,
               seq_len: int | None = None):
    """Re-rotate already-rotated cached keys by a position delta (Positional Integrity Encoding).

    Equals ``apply_rope`` at positions + delta applied to the unrotated keys, without
    recomputing them.

    Args:
        k: rotated keys, [B, S, H, D] / [B, H, S, D] / [T, H, D] as for apply_rope.
        delta: a Python int/float or a 0-d tensor (the same shift for every token), or a
            tensor shaped like apply_rope's positions ([S], [B, S], [T]; negative allowed;
            int or float). For multi-axis specs a delta without the axis dimension shifts
            every axis; [n_axes, ...] shifts each axis by its own delta.
        spec: the spec the keys were rotated with.
        positions: the keys' current positions (apply_rope's formats). Required when the
            spec's position map is not linear (dimension-wise DPE groups): the old
            rotation is undone and the new one applied. Ignored otherwise.
        inplace: rotate k in place (and return it).
        seq_len: as for apply_rope; specs whose tables depend on the sequence length need
            it (or positions).

    Returns:
        the shifted keys (k itself when inplace).
    """
    if (not _is_compiling() and k.__class__ is _Tensor and spec.__class__ is RopeSpec
            and not (_grad_enabled() and k.requires_grad)
            and (positions is None or positions.__class__ is _Tensor)
            and (inplace is False or inplace is True) and (seq_len is None or seq_len.__class__ is int)
            and layout.__class__ is str and (backend is None or backend.__class__ is str)):
        # hot path: a signature seen before runs its plan (as apply_rope); a scalar delta is
        # part of the signature by its type only, its value goes to the kernel as is
        dc = delta.__class__
        if dc is int:
            dkey = int if -_EXACT_INT < delta < _EXACT_INT else None  # exact as a float64 position
        elif dc is float:
            dkey = float
        elif dc is _Tensor and not (_grad_enabled() and delta.requires_grad):
            dkey = (delta.shape, delta.dtype, delta.device)
        else:
            dkey = None
        if dkey is not None:
            pk = (k.shape, k.stride(), k.dtype, k.device, dkey, spec,
                  None if positions is None else (positions.shape, positions.dtype, positions.device),
                  layout, inplace, backend, seq_len, _ctx_backend(), _env_backend())
            plan = _SHIFT_PLANS.get(pk)
            if plan is not None:
                return plan.run(k, None, delta if dc is _Tensor else float(delta))[0]
            return _rope_shift_checked(k, delta, spec, positions, layout, inplace, backend, seq_len, pk)
    return _rope_shift_checked(k, delta, spec, positions, layout, inplace, backend, seq_len, None)


_EXACT_INT = 1 << 53


def _rope_shift_checked(k, delta, spec, positions, layout, inplace, backend, seq_len, pk):
    """rope_shift with every check; stores a plan under ``pk`` (when not None) for the linear
    case once they pass: k is rotated as a query by the delta alone (unit scaling)."""
    V.float_tensor(k, "k")
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a posattn.RopeSpec, got {type(spec).__name__}")
    V.choice(layout, "layout", LAYOUTS)
    V.boolean(inplace, "inplace")
    _check_x(k, "k", layout)
    k4 = _as_bshd(k, layout)
    B, S, H, D = k4.shape
    if D != spec.head_dim:
        raise ValueError(f"k's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    if positions is not None:
        _pos_tensor(positions)
        V.same_device(k, "k", positions=positions)
    tables = _tables_for(spec, k.device, positions, seq_len)
    A = tables.n_axes
    if isinstance(delta, bool) or not isinstance(delta, (int, float, torch.Tensor)):
        raise TypeError(f"delta must be an int, a float or a tensor; got {type(delta).__name__}")
    if isinstance(delta, torch.Tensor):
        _pos_tensor(delta, "delta")
        V.same_device(k, "k", delta=delta)
        if delta.dim() == 0:
            d3 = delta.reshape(1, 1, 1).expand(A, 1, S)
        elif A > 1 and delta.shape[0] == A and delta.dim() >= 2:
            d3 = _positions_3d(delta, B, S, layout, A, "delta")
        else:
            d3 = _positions_3d(delta, B, S, layout, 1, "delta").expand(A, -1, -1)
    else:
        dt = torch.int64 if isinstance(delta, int) else torch.float64
        d3 = torch.full((1, 1, 1), delta, dtype=dt, device=k.device).expand(A, 1, S)
    rows = _check_rows(tables, 0, H)
    unit = RopeTables(tables.inv_freq, 1.0, tables.pair_axis, A)
    scalar = not isinstance(delta, torch.Tensor)
    if (pk is not None and tables.pair_pos_scale is None and not (seq_len is None and spec.depends_on_seq_len)
            and (scalar or (A == 1 and delta.dim() >= 1))):
        # eager, no grad, plain tensors, a linear position map: the checks above depend only
        # on what pk holds. k is rotated in the query role (no DPE offset in unit tables).
        key = _make_key(k4, H, 0, spec.rotary_dim, spec.interleaved, "float64" if scalar else _dname(d3.dtype),
                        A, rows, False)
        kernel, config = dispatch.select("rope", key, backend=backend)
        plan = _RopePlan(kernel, config, unit, (A, 1, S) if scalar else tuple(d3.shape), k4, None,
                         spec.rotary_dim, spec.interleaved, layout, inplace, scalar=scalar)
        _plans.store(_SHIFT_PLANS, pk, plan, PLAN_CACHE_SIZE)
        return plan.run(k, None, float(delta) if scalar else delta)[0]
    q4 = k4.new_empty(B, S, 0, D)
    if tables.pair_pos_scale is None:
        key = _make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, _dname(d3.dtype), A, rows, False)
        _, kout = _run_positions(q4, k, q4, k4, d3, unit, spec.rotary_dim, spec.interleaved, 1.0,
                                 layout, inplace, key, backend)
        return kout
    if positions is None:
        raise ValueError("positions is required by rope_shift for this spec: its position map is not "
                         "linear (dimension-wise groups), so the old rotation is undone and the new "
                         "one applied")
    pos3 = _positions_3d(positions, B, S, layout, A)
    new3 = pos3 + d3  # broadcasts [A, 1|B, S]; int + float promotes to float
    dpe = RopeTables(tables.inv_freq, 1.0, tables.pair_axis, A, tables.pair_pos_scale, tables.pair_q_offset)
    key_old = _make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, _dname(pos3.dtype), A, rows, True)
    key_new = _make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, _dname(new3.dtype), A, rows, True)
    _, undone = _run_positions(q4, k, q4, k4, pos3, dpe, spec.rotary_dim, spec.interleaved, -1.0,
                               layout, inplace, key_old, backend)
    _, out = _run_positions(q4, undone, q4, _as_bshd(undone, layout), new3, dpe, spec.rotary_dim,
                            spec.interleaved, 1.0, layout, inplace, key_new, backend)
    return out


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

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype == "float64":
        return False, "float64 is not compiled for Triton"
    return True, ""


def _triton_fn(*args):
    from posattn.kernels.triton import rope as tr

    return tr.rope_forward(*args)


def _triton_angles_fn(*args):
    from posattn.kernels.triton import rope as tr

    return tr.rope_angles_forward(*args)


def _triton_default(key: RopeKey):
    from posattn.kernels.triton import rope as tr

    return tr.default_config(key.head_dim, key.rotary_dim, max(key.heads_q, key.heads_k))


_ALL_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _triton_search_space(key):
    from posattn.kernels.triton import rope as tr

    return tr.rope_search_space(key)


dispatch.register("rope", "reference", dtypes=("float32", "float16", "bfloat16", "float64"))(ref_kernels.rope_forward)
dispatch.register("rope", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cpu_kernels.rope_search_space, prepare=cpu_kernels.rope_prepare)(cpu_kernels.rope_forward)
dispatch.register("rope", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 128},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cuda_kernels.rope_search_space)(cuda_kernels.rope_forward)
dispatch.register("rope", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=_triton_search_space)(_triton_fn)

dispatch.register("rope_angles", "reference", dtypes=_ALL_DTYPES)(ref_kernels.rope_angles_forward)
dispatch.register("rope_angles", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16}, dtypes=_ALL_DTYPES,
                  search_space=cpu_kernels.rope_search_space,
                  prepare=cpu_kernels.rope_angles_prepare)(cpu_kernels.rope_angles_forward)
dispatch.register("rope_angles", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 128},
                  dtypes=_ALL_DTYPES, search_space=cuda_kernels.rope_search_space)(cuda_kernels.rope_angles_forward)
dispatch.register("rope_angles", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=_triton_search_space)(_triton_angles_fn)

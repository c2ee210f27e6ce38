"""apply_rope, apply_rope_angles, rope_shift: the public ops.

Each checks its arguments (layout.py), lowers the spec to tables (RopeSpec.tables), builds the
kernel key and runs: a signature seen before runs its plan (plans.py: a dict lookup, the
output allocation and the kernel call); otherwise the checked path runs the kernel directly
(eager, no grad) or through the custom ops (custom_ops.py: autograd, torch.compile). The
kernels that serve the ops are registered in backends.py.

Every kernel sees only lowered data (posattn.lowered.RopeTables, or an explicit angles
tensor) and [B, S, H, D] views whose last dimension is contiguous; see
posattn/kernels/cpu.py for the contract.
"""
from __future__ import annotations

import torch

from posattn import _plans, dispatch
from posattn import _validate as V
from posattn.lowered import RopeTables
from posattn.rope import backends as _backends  # noqa: F401  (registers the kernels)
from posattn.rope import plans as P
from posattn.rope.custom_ops import compiling, direct, needs_grad, plain, replicate_like, run_positions
from posattn.rope.layout import (LAYOUTS, RopeKey, as_bshd, check_qk, check_rows, check_x, dname, from_bshd,
                                 last_contig, make_key, pos_tensor, positions_3d, tables_for)
from posattn.rope.plans import clear_plans
from posattn.rope.spec import RopeSpec

__all__ = ["apply_rope", "apply_rope_angles", "rope_shift", "clear_plans", "RopeKey"]

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_ctx_backend = dispatch.context_backend
_env_backend = dispatch.env_backend_raw
_PLANS, _ANGLE_PLANS, _SHIFT_PLANS = P.PLANS, P.ANGLE_PLANS, P.SHIFT_PLANS


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
    pos_tensor(positions)
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a posattn.RopeSpec, got {type(spec).__name__}")
    V.choice(layout, "layout", LAYOUTS)
    V.boolean(inplace, "inplace")
    check_qk(q, k, layout)
    V.same_device(q, "q", k=k, positions=positions)
    q4 = as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    if D != spec.head_dim:
        raise ValueError(f"q's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    k4 = as_bshd(k, layout) if k is not None else None
    HK = k4.shape[2] if k4 is not None else 0
    tables = tables_for(spec, q.device, positions, seq_len)
    pos3 = positions_3d(positions, B, S, layout, tables.n_axes)
    rows = check_rows(tables, HQ, HK)
    key = make_key(q4, HQ, HK, spec.rotary_dim, spec.interleaved, dname(positions.dtype),
                   tables.n_axes, rows, tables.pair_pos_scale is not None)
    if pk is not None and not (seq_len is None and spec.depends_on_seq_len):
        # eager, no grad, plain tensors: everything checked above is fixed by pk (tables too,
        # unless they depend on the positions' values); the kernel choice is fixed until
        # dispatch.clear_memo(), which drops every plan
        kernel, config = dispatch.select("rope", key, backend=backend, device_index=q4.device.index)
        plan = P.RopePlan(kernel, config, tables, tuple(pos3.shape), q4, k4, spec.rotary_dim,
                         spec.interleaved, layout, inplace)
        _plans.store(_PLANS, pk, plan, P.PLAN_CACHE_SIZE)
        return plan.run(q, k, positions)
    return run_positions(q, k, q4, k4, pos3, tables, spec.rotary_dim, spec.interleaved, 1.0, layout,
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
    return last_contig(a4.float())


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
    check_qk(q, k, layout)
    V.same_device(q, "q", k=k, angles=angles)
    q4 = as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    k4 = as_bshd(k, layout) if k is not None else None
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
    key = make_key(q4, HQ, HK, rotary_dim, interleaved, "angles", 1, rows, False)
    if pk is not None:
        # eager, no grad, plain tensors: the checks above depend only on what pk holds
        kernel, config = dispatch.select("rope_angles", key, backend=backend, device_index=q4.device.index)
        fix = _angles_to_fp32 if kernel.backend != "reference" and angles.dtype != torch.float32 else last_contig
        plan = P.RopePlan(kernel, config, None, tuple(ang4.shape), q4, k4, rotary_dim, interleaved, layout,
                         inplace, src_fix=fix)
        _plans.store(_ANGLE_PLANS, pk, plan, P.PLAN_CACHE_SIZE)
        return plan.run(q, k, angles)
    if not plain(q, k, angles):
        ang4, = replicate_like(q4, ang4)
    elif not compiling() and not needs_grad(q, k, angles):
        return direct("rope_angles", q, k, q4, k4, (ang4,), rotary_dim, interleaved, 1.0, layout, inplace,
                      key, backend)
    if not compiling():
        kernel, _ = dispatch.select("rope_angles", key, backend=backend, device_index=q4.device.index)
        backend = kernel.backend
    name = backend or ""
    kk4 = k4 if k4 is not None else q4.new_empty(B, S, 0, D)
    if inplace and not needs_grad(q, k, angles):
        qi, ki = last_contig(q4), last_contig(kk4)
        torch.ops.posattn.rope_angles_(qi, ki, ang4, rotary_dim, interleaved, 1.0, name)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4, ko4 = torch.ops.posattn.rope_angles(last_contig(q4), last_contig(kk4), ang4, rotary_dim,
                                             interleaved, 1.0, name)
    if inplace:
        q4.copy_(qo4)
        if k4 is not None:
            k4.copy_(ko4)
        return q, k
    return from_bshd(qo4, layout), (from_bshd(ko4, layout) if k is not None else None)


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
    check_x(k, "k", layout)
    k4 = as_bshd(k, layout)
    B, S, H, D = k4.shape
    if D != spec.head_dim:
        raise ValueError(f"k's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    if positions is not None:
        pos_tensor(positions)
        V.same_device(k, "k", positions=positions)
    tables = tables_for(spec, k.device, positions, seq_len)
    A = tables.n_axes
    if isinstance(delta, bool) or not isinstance(delta, (int, float, torch.Tensor)):
        raise TypeError(f"delta must be an int, a float or a tensor; got {type(delta).__name__}")
    if isinstance(delta, torch.Tensor):
        pos_tensor(delta, "delta")
        V.same_device(k, "k", delta=delta)
        if delta.dim() == 0:
            d3 = delta.reshape(1, 1, 1).expand(A, 1, S)
        elif A > 1 and delta.shape[0] == A and delta.dim() >= 2:
            d3 = positions_3d(delta, B, S, layout, A, "delta")
        else:
            d3 = positions_3d(delta, B, S, layout, 1, "delta").expand(A, -1, -1)
    else:
        dt = torch.int64 if isinstance(delta, int) else torch.float64
        d3 = torch.full((1, 1, 1), delta, dtype=dt, device=k.device).expand(A, 1, S)
    rows = check_rows(tables, 0, H)
    unit = RopeTables(tables.inv_freq, 1.0, tables.pair_axis, A)
    scalar = not isinstance(delta, torch.Tensor)
    if (pk is not None and tables.pair_pos_scale is None and not (seq_len is None and spec.depends_on_seq_len)
            and (scalar or (A == 1 and delta.dim() >= 1))):
        # eager, no grad, plain tensors, a linear position map: the checks above depend only
        # on what pk holds. k is rotated in the query role (no DPE offset in unit tables).
        key = make_key(k4, H, 0, spec.rotary_dim, spec.interleaved, "float64" if scalar else dname(d3.dtype),
                       A, rows, False)
        kernel, config = dispatch.select("rope", key, backend=backend, device_index=k4.device.index)
        plan = P.RopePlan(kernel, config, unit, (A, 1, S) if scalar else tuple(d3.shape), k4, None,
                         spec.rotary_dim, spec.interleaved, layout, inplace, scalar=scalar)
        _plans.store(_SHIFT_PLANS, pk, plan, P.PLAN_CACHE_SIZE)
        return plan.run(k, None, float(delta) if scalar else delta)[0]
    q4 = k4.new_empty(B, S, 0, D)
    if tables.pair_pos_scale is None:
        key = make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, dname(d3.dtype), A, rows, False)
        _, kout = run_positions(q4, k, q4, k4, d3, unit, spec.rotary_dim, spec.interleaved, 1.0,
                                layout, inplace, key, backend)
        return kout
    if positions is None:
        raise ValueError("positions is required by rope_shift for this spec: its position map is not "
                         "linear (dimension-wise groups), so the old rotation is undone and the new "
                         "one applied")
    pos3 = positions_3d(positions, B, S, layout, A)
    new3 = pos3 + d3  # broadcasts [A, 1|B, S]; int + float promotes to float
    dpe = RopeTables(tables.inv_freq, 1.0, tables.pair_axis, A, tables.pair_pos_scale, tables.pair_q_offset)
    key_old = make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, dname(pos3.dtype), A, rows, True)
    key_new = make_key(k4, 0, H, spec.rotary_dim, spec.interleaved, dname(new3.dtype), A, rows, True)
    _, undone = run_positions(q4, k, q4, k4, pos3, dpe, spec.rotary_dim, spec.interleaved, -1.0,
                              layout, inplace, key_old, backend)
    _, out = run_positions(q4, undone, q4, as_bshd(undone, layout), new3, dpe, spec.rotary_dim,
                           spec.interleaved, 1.0, layout, inplace, key_new, backend)
    return out

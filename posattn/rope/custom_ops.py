"""The torch.library custom ops apply_rope and apply_rope_angles run through when autograd
or torch.compile is involved, and how a checked call runs (``direct``: the kernel itself,
eagerly and without grad; ``run_positions``: through the custom ops otherwise).

``posattn::rope`` and ``posattn::rope_angles`` have fake (meta) implementations and
registered backwards, so they differentiate on every backend and trace under
``torch.compile(fullgraph=True)``. The backward of a rotation by theta is the same kernel at
-theta (sign=-1), with the DPE query offset applied to the query gradient as in the forward.
The gradient of apply_rope_angles with respect to the angle of pair p is
``sign * sum_heads (x1 * gx2 - x2 * gx1)`` with gx the input gradient.

``inplace=True`` runs the kernel in place (``posattn::rope_``, a mutating custom op) when no
gradient is needed. When q or k requires grad it is done like torch's own in-place ops: the
rotation is computed out of place and copied into q / k through autograd, so a leaf that
requires grad raises torch's usual in-place error and non-leaf tensors get correct gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from posattn import dispatch
from posattn.lowered import RopeTables
from posattn.rope.layout import RopeKey, from_bshd, last_contig, make_key, new_like, pos_key_dtype


def _select(op: str, key: RopeKey, backend: str, x: torch.Tensor):
    return dispatch.select(op, key, backend=backend or None, device_index=x.device.index)


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
    key = make_key(x, q.shape[2], k.shape[2], rotary_dim, interleaved, pos_key_dtype(pos3),
                   pos3.shape[0], rows, pair_pos_scale is not None)
    kernel, config = _select("rope", key, backend, x)
    kernel.fn(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config)


@torch.library.custom_op("posattn::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, pos3: torch.Tensor, inv_freq: torch.Tensor,
             pair_axis: Optional[torch.Tensor], pair_pos_scale: Optional[torch.Tensor],
             pair_q_offset: Optional[torch.Tensor], attention_scaling: float, rotary_dim: int,
             interleaved: bool, sign: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S, Hq, D], k: [B, S, Hk, D] (Hk may be 0), pos3: [A, Bp, S] -> rotated copies."""
    qo, ko = new_like(q), new_like(k)
    _run_rope(q, qo, k, ko, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
              attention_scaling, rotary_dim, interleaved, sign, backend)
    return qo, ko


@_rope_op.register_fake
def _rope_fake(q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling,
               rotary_dim, interleaved, sign, backend):
    return new_like(q), new_like(k)


def _rope_setup(ctx, inputs, output):
    (q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling, rotary_dim,
     interleaved, sign, backend) = inputs
    ctx.save_for_backward(pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset)
    ctx.attrs = (attention_scaling, rotary_dim, interleaved, sign, backend)
    ctx.shapes = (q, k)


def _grad_in(g, like):
    if g is None or (g.__class__ is torch.Tensor and not plain(like)):
        # None, or autograd's materialised zeros for an unused output, which are a plain tensor
        # even when the output is a DTensor
        return torch.zeros_like(like)
    return last_contig(g)


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
    key = make_key(x, q.shape[2], k.shape[2], rotary_dim, interleaved, "angles", 1, angles.shape[2], False)
    kernel, config = _select("rope_angles", key, backend, x)
    if kernel.backend != "reference" and angles.dtype != torch.float32:
        angles = angles.float()
    kernel.fn(q, qo, k, ko, last_contig(angles), rotary_dim, interleaved, sign, config)


@torch.library.custom_op("posattn::rope_angles", mutates_args=())
def _rope_angles_op(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, rotary_dim: int,
                    interleaved: bool, sign: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S, Hq, D], k: [B, S, Hk, D], angles: [Ba, S, Ha, R/2] -> rotated copies."""
    qo, ko = new_like(q), new_like(k)
    _run_angles(q, qo, k, ko, angles, rotary_dim, interleaved, sign, backend)
    return qo, ko


@_rope_angles_op.register_fake
def _rope_angles_fake(q, k, angles, rotary_dim, interleaved, sign, backend):
    return new_like(q), new_like(k)


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
# how a checked call runs

def needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def plain(*xs) -> bool:
    """No input is a tensor subclass: only then may a call hand data pointers to a kernel
    directly (a DTensor's data pointer is not its data: it must go through the custom op)."""
    return all(x is None or x.__class__ is torch.Tensor for x in xs)


def replicate_like(x, *ts):
    """Tables (and plain positions) beside DTensor inputs enter the custom op as replicated
    DTensors on x's mesh, so the op's sharding rule (posattn.distributed.dtensor) sees every
    placement and the autograd backward gets DTensors too. Other inputs pass unchanged."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(x, DTensor):
        return ts
    import posattn.distributed.dtensor  # noqa: F401  (registers the ops' sharding rules)

    rep = [Replicate()] * x.device_mesh.ndim
    return tuple(t if t is None or isinstance(t, DTensor) else DTensor.from_local(t, x.device_mesh, rep,
                                                                                 run_check=False)
                 for t in ts)


def direct(op, q, k, q4, k4, data, rotary_dim, interleaved, sign, layout, inplace, key, backend):
    """Eager, no gradient needed: select and launch without the custom-op machinery
    (which costs ~100 us a call); ``data`` is (pos3, tables) or (angles,)."""
    kernel, config = dispatch.select(op, key, backend=backend, device_index=q4.device.index)
    qi = last_contig(q4)
    ki = last_contig(k4) if k4 is not None else None
    if op == "rope_angles" and kernel.backend != "reference" and data[0].dtype != torch.float32:
        data = (data[0].float(),)
    if op == "rope_angles":
        data = (last_contig(data[0]),)
    if inplace:
        kernel.fn(qi, qi, ki, ki, *data, rotary_dim, interleaved, sign, config)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4 = new_like(qi)
    ko4 = new_like(ki) if ki is not None else None
    kernel.fn(qi, qo4, ki, ko4, *data, rotary_dim, interleaved, sign, config)
    return from_bshd(qo4, layout), (from_bshd(ko4, layout) if k is not None else None)


def run_positions(q, k, q4, k4, pos3, tables, rotary_dim, interleaved, sign, layout, inplace,
                  key, backend):
    """Run posattn::rope / rope_ on [B, S, H, D] views (or the kernel directly, eagerly and
    without grad); returns outputs in layout."""
    if not compiling() and not needs_grad(q, k) and plain(q, k, pos3):
        return direct("rope", q, k, q4, k4, (pos3, tables), rotary_dim, interleaved, sign, layout, inplace,
                      key, backend)
    if not compiling():
        kernel, _ = dispatch.select("rope", key, backend=backend, device_index=q4.device.index)
        backend = kernel.backend
    name = backend or ""
    kk4 = k4 if k4 is not None else q4.new_empty(q4.shape[0], q4.shape[1], 0, q4.shape[3])
    targs = (pos3, tables.inv_freq, tables.pair_axis, tables.pair_pos_scale, tables.pair_q_offset)
    if not plain(q4, pos3):
        targs = replicate_like(q4, *targs)
    targs += (float(tables.attention_scaling), rotary_dim, interleaved, float(sign), name)
    if inplace and not needs_grad(q, k):
        qi, ki = last_contig(q4), last_contig(kk4)
        torch.ops.posattn.rope_(qi, ki, *targs)
        if qi is not q4:
            q4.copy_(qi)
        if k4 is not None and ki is not k4:
            k4.copy_(ki)
        return q, k
    qo4, ko4 = torch.ops.posattn.rope(last_contig(q4), last_contig(kk4), *targs)
    if inplace:  # through autograd, like torch's in-place ops
        q4.copy_(qo4)
        if k4 is not None:
            k4.copy_(ko4)
        return q, k
    return from_bshd(qo4, layout), (from_bshd(ko4, layout) if k is not None else None)

"""apply_rope's, apply_rope_angles' and rope_shift's per-signature plans (the eager, no-grad
hot path).

apply_rope's checks, its kernel key, the backend choice and the lowered tables
depend only on the inputs' metadata (shapes, strides, dtypes, devices), the spec,
the keyword arguments and the backend request (backend=, use_backend(), the
POSATTN_BACKEND environment variable) -- never on tensor contents, except for
specs whose tables depend on max(positions) (seq_len=None with DynamicNTK or
LongRoPE), which are never planned. A plan stores the outcome for one such
signature, so that a repeated call costs one dict lookup, the views and the
output allocation before the kernel runs. Plans are made only after every
check passed, so a bad input never finds one (its key has never been stored).
dispatch.clear_memo() (autotune reloads, new registrations) drops them all.
"""
from __future__ import annotations

import torch

from posattn import _plans
from posattn.rope.layout import as_bshd, from_bshd

_empty_like = torch.empty_like
_empty = torch.empty

PLAN_CACHE_SIZE = 512  # signatures kept; the cache is emptied when full (0: no plans)
PLANS: dict = _plans.new_table()
ANGLE_PLANS: dict = _plans.new_table()   # apply_rope_angles' plans (the same RopePlan, tables None)
SHIFT_PLANS: dict = _plans.new_table()   # rope_shift's plans (k in the query role)


def clear_plans() -> None:
    """Forget every apply_rope, apply_rope_angles and rope_shift plan (dispatch.clear_memo() does this too)."""
    PLANS.clear()
    ANGLE_PLANS.clear()
    SHIFT_PLANS.clear()


def _scalar_positions(value: float, shape, device) -> torch.Tensor:
    """fp64 positions of ``shape`` [A, 1, S], all ``value`` (one element, expanded)."""
    return torch.full((1, 1, 1), value, dtype=torch.float64, device=device).expand(shape)


def _keeps_last_dim(x4: torch.Tensor) -> bool:
    """Whether empty_like(x4) is last-dim contiguous (what new_like checks), without allocating."""
    return torch.empty_like(x4, device="meta").stride(-1) == 1


class RopePlan:
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
        self.q_copy = not (q4.stride(-1) == 1 or q4.shape[-1] == 1)   # as last_contig
        self.k_copy = k4 is not None and not (k4.stride(-1) == 1 or k4.shape[-1] == 1)
        self.q_like = self.q_copy or _keeps_last_dim(q4)              # as new_like
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
        q4, k4 = as_bshd(q, layout), (as_bshd(k, layout) if k is not None else None)
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
        return from_bshd(qo, layout), (from_bshd(ko, layout) if ko is not None else None)

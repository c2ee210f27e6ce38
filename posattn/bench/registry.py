"""What gets benchmarked: ops, their input generators, and the backends and peers that run them.

One small module per op under ``posattn/bench/ops/`` builds a :class:`BenchOp`
and registers its backends and peers with decorators::

    op = BenchOp("rope", make_inputs=..., reference=..., sweep=..., bytes=..., flops=...)

    @op.backend("cpu")                        # a posattn backend
    def _(inputs, ctx):
        return lambda: posattn.apply_rope(..., backend="cpu")

    @op.peer("transformers", available=_has_transformers)   # what a user would pick instead
    def _(inputs, ctx):
        ...
        return fn, to_canonical

A factory gets its own copy of the inputs and returns the callable to time
(optionally with a function turning its output into the reference's
canonical form). It raises :class:`Unsupported` for inputs it cannot run; a
peer whose library is missing is skipped with the reason ``available`` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class Unsupported(Exception):
    """A backend or peer cannot run this case; the message says why."""


@dataclass
class Impl:
    name: str
    kind: str  # "posattn" | "peer"
    factory: Callable
    available: Callable[[str], tuple[bool, str]]  # device_type -> (ok, why not)
    full_only: bool = False  # only in the full sweep (or when named explicitly)
    note: str = ""  # what the timed region contains, shown in the dashboard


@dataclass
class Shape:
    """One point of a sweep: named integer dimensions and the x-axis size."""

    dims: dict
    size: int  # the x-axis value (e.g. tokens)

    @property
    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.dims.items())

    @property
    def label(self) -> str:
        return " ".join(f"{k}{v}" for k, v in self.dims.items())


@dataclass
class Case:
    """Inputs for one (shape, dtype) on one device."""

    shape: Shape
    dtype: Any  # torch.dtype
    device: str
    tensors: dict


@dataclass
class BenchOp:
    """An op's benchmark cases.

    Args:
        name: the op's name in results ("rope").
        title: a human title for the dashboard.
        make_inputs(shape, dtype, device) -> dict of tensors and values.
        reference(inputs) -> tuple of fp64 tensors (canonical outputs), or None when no
            reference is affordable at this size (then no accuracy is recorded).
        sweep(mode, device_type) -> list of Shape; mode is "quick" or "full".
        dtypes(mode, device_type) -> list of torch dtypes.
        bytes(shape, dtype) -> bytes moved by an ideal kernel (read + write).
        flops(shape, dtype) -> floating-point operations of the op (0 if not meaningful).
        size_name: what the x-axis size counts ("tokens").
        baseline: the impl speed-ups are measured against (first that ran of this list).
        parse_shape(text) -> Shape: turns "B=1,S=64,..." back into a Shape (for --shape).
    """

    name: str
    make_inputs: Callable
    reference: Callable
    sweep: Callable
    dtypes: Callable
    bytes: Callable
    flops: Callable
    parse_shape: Callable
    title: str = ""
    size_name: str = "size"
    baseline: tuple[str, ...] = ()
    impls: dict = field(default_factory=dict)

    def _add(self, name, kind, available, full_only, note):
        def deco(factory):
            if name in self.impls:
                raise ValueError(f"{self.name}: {name!r} is registered twice")
            self.impls[name] = Impl(name, kind, factory, available or _always, full_only, note)
            return factory
        return deco

    def backend(self, name: str, *, available=None, full_only: bool = False, note: str = ""):
        """Register a posattn backend's factory."""
        return self._add(name, "posattn", available, full_only, note)

    def peer(self, name: str, *, available=None, full_only: bool = False, note: str = ""):
        """Register a peer library's factory (used only when importable)."""
        return self._add(name, "peer", available, full_only, note)


def _always(_device_type: str) -> tuple[bool, str]:
    return True, ""


_OPS: dict[str, BenchOp] = {}
_SKIPPED: dict[str, str] = {}


def register_op(op: BenchOp) -> BenchOp:
    _OPS[op.name] = op
    return op


def skip_op(name: str, why: str) -> None:
    """Record that an op module found its op missing (e.g. not merged yet)."""
    _SKIPPED[name] = why


def ops() -> dict[str, BenchOp]:
    """Every op whose module registered it (imports posattn.bench.ops first)."""
    from posattn.bench import ops as _ops_pkg

    _ops_pkg.load_all()
    return dict(_OPS)


def skipped_ops() -> dict[str, str]:
    from posattn.bench import ops as _ops_pkg

    _ops_pkg.load_all()
    return dict(_SKIPPED)

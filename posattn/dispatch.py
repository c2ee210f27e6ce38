"""Kernel registry and backend choice.

Every op registers one kernel per backend::

    @register("rope", "cpu", supports=_cpu_supports, default_config=lambda key: {...})
    def rope_cpu(...): ...

and its public function asks :func:`select` for the kernel to run::

    kernel, config = select("rope", key, backend=backend)
    kernel.fn(..., config)

``key`` is the op's *kernel key*: a hashable description of the input
signature that the choice depends on (device type, dtype, layout, head_dim,
spec constexprs...). It must have a ``device_type`` attribute.

Choice order: the explicit ``backend=`` argument, then ``use_backend(...)`` /
``POSATTN_BACKEND``, then the tuned cache (when the autotuner installed a
lookup), then the default order :data:`DEFAULT_ORDER`, ``triton > cuda > cpu >
reference``, among the backends that are usable here and whose
``supports(key)`` accepts the inputs.

A kernel that has not been verified on this kind of device is never the
default: the CUDA C++ kernels come after Triton on a GPU, and only a tuned
entry (which ``posattn tune`` and ``benchmarks/gpu_check.sh`` write only after
checking each candidate against the fp64 reference, see
:mod:`posattn.autotune.tuner`) can put them first, for the keys it covers. On
CPU tensors the order is ``cpu > reference``: the Triton interpreter serves
them only when asked for by name (each op's Triton ``supports`` refuses them
otherwise). ``posattn info`` shows, per device and backend, whether a tuned
entry or shipped config exists (:func:`verified_backends`).

The decision is memoised per (op, key, requested backend, CUDA device index):
two GPUs of different kinds in one process never share a decision. After the
first call the hot path is one dict lookup (plus, for CUDA keys whose caller
does not pass ``device_index``, one read of the current device).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

# the default order without a tuned entry (see the module docstring); also the order of listings
DEFAULT_ORDER: tuple[str, ...] = ("triton", "cuda", "cpu", "reference")
BACKENDS: tuple[str, ...] = DEFAULT_ORDER
_PRIORITY = {name: i for i, name in enumerate(BACKENDS)}


@dataclass(frozen=True)
class Kernel:
    """One op's implementation on one backend."""

    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Callable[[Any], tuple[bool, str]]
    default_config: Callable[[Any], dict]
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    search_space: Callable[[Any], list[dict]] | None = None
    version: int = 1
    # optional: fn prepared for one call signature, prepare(*fn's arguments) -> run(tensors...);
    # each op's kernel contract says which arguments run takes (posattn.kernels.cpu.rope_prepare)
    prepare: Callable[..., Callable[..., Any]] | None = None


_registry: dict[str, dict[str, Kernel]] = {}
_memo: dict[tuple, tuple[Kernel, dict]] = {}
_lock = threading.Lock()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("posattn_backend", default=None)
# called (no arguments) whenever the memo is dropped, by callers that keep their own
# per-signature state derived from select() (posattn.rope.ops plans)
_memo_listeners: list[Callable[[], None]] = []

# Installed by posattn.autotune: (op, kernel, key) -> tuned config or None, and
# (op, key, {backend: Kernel}) -> tuned backend name or None (the kernels are
# passed so the lookup can skip entries of another kernel version). Kept as
# hooks so that dispatch does not import the tuner (and the tuner never
# imports ops). They run only on a memo miss, never on the hot path.
_tuned_config_lookup: Callable[[str, Kernel, Any], dict | None] | None = None
_tuned_backend_lookup: Callable[[str, Any, dict], str | None] | None = None


def _always(_key) -> tuple[bool, str]:
    return True, ""


def _no_config(_key) -> dict:
    return {}


def register(op: str, backend: str, *, supports=None, default_config=None, dtypes=None,
             search_space=None, version: int = 1, prepare=None):
    """Decorator registering ``fn`` as ``op``'s kernel on ``backend``."""
    if backend not in _PRIORITY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        k = Kernel(op=op, backend=backend, fn=fn, supports=supports or _always,
                   default_config=default_config or _no_config,
                   dtypes=tuple(dtypes) if dtypes else ("float32", "float16", "bfloat16"),
                   search_space=search_space, version=version, prepare=prepare)
        with _lock:
            _registry.setdefault(op, {})[backend] = k
            _memo.clear()
        _notify_cleared()
        return fn

    return deco


def kernels(op: str | None = None) -> dict[str, dict[str, Kernel]] | dict[str, Kernel]:
    """The registry (all ops, or one op's backends)."""
    _load_ops()
    if op is None:
        return {o: dict(v) for o, v in _registry.items()}
    return dict(_registry.get(op, {}))


def _load_ops() -> None:
    # Importing the public package registers every op's kernels.
    import posattn  # noqa: F401


# --------------------------------------------------------------------------
# backend availability (independent of any op)

_avail_cache: dict[str, tuple[bool, str]] = {}


def backend_status(name: str) -> tuple[bool, str]:
    """(usable here, reason when not) for a backend name."""
    if name not in _PRIORITY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in _avail_cache:
        _avail_cache[name] = _probe(name)
    return _avail_cache[name]


def _probe(name: str) -> tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name == "cpu":
        from posattn.kernels import cpu

        return cpu.status()
    if name == "cuda":
        from posattn.kernels import cuda

        return cuda.status()
    if name == "triton":
        from posattn.kernels import triton as triton_kernels

        ok, why = triton_kernels.status()
        return ok, ("" if ok else why)
    raise AssertionError(name)


# --------------------------------------------------------------------------
# choice


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager forcing a backend for every op called inside it.

    ``None`` restores automatic choice. Overrides ``POSATTN_BACKEND``; an
    explicit ``backend=`` argument still wins.
    """
    if name is not None:
        _check_name(name, "use_backend(name)")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _check_name(name, what: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a backend name (str), got {type(name).__name__}")
    if name not in _PRIORITY:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")


# What requested_backend(None) reads, as cheap values for callers that memoise per request
# (posattn.rope.ops plans): the use_backend() context and the raw POSATTN_BACKEND value
# (read from os.environ's own mapping, which os.environ[...] = / del / monkeypatch update;
# os.environ.get costs ~1 us a call).
context_backend = _override.get
_env_data = getattr(os.environ, "_data", None)
try:
    _env_key = os.environ.encodekey("POSATTN_BACKEND")  # type: ignore[attr-defined]
except AttributeError:
    _env_key = None
if isinstance(_env_data, dict) and _env_key is not None:
    env_backend_raw = functools.partial(_env_data.get, _env_key)
else:  # another Python's os.environ: the plain (slower) read
    env_backend_raw = functools.partial(os.environ.get, "POSATTN_BACKEND")


def requested_backend(explicit: str | None) -> tuple[str | None, str]:
    """The backend asked for, and where the request came from."""
    if explicit is not None:
        _check_name(explicit, "backend")
        return explicit, "backend"
    ctx = _override.get()
    if ctx is not None:
        return ctx, "use_backend"
    env = os.environ.get("POSATTN_BACKEND") or None
    if env is not None:
        _check_name(env, "POSATTN_BACKEND")
        return env, "POSATTN_BACKEND"
    return None, ""


def select(op: str, key: Hashable, *, backend: str | None = None,
           device_index: int | None = None) -> tuple[Kernel, dict]:
    """The kernel and launch config to run ``op`` on inputs described by ``key``.

    ``device_index``: the CUDA device the inputs live on (``q.device.index``); for a CUDA
    key without it, the current device. Ignored for other device types.
    """
    name, source = requested_backend(backend)
    if key.device_type == "cuda":
        if device_index is None:
            device_index = _cuda_current_index()
    else:
        device_index = None
    mk = (op, key, name, device_index)
    hit = _memo.get(mk)
    if hit is not None:
        return hit
    with _device_scope(device_index):
        result = _select_uncached(op, key, name, source)
    with _lock:
        _memo[mk] = result
    return result


def _cuda_current_index() -> int:
    import torch

    return torch.cuda.current_device()


def _device_scope(index: int | None):
    """Make CUDA device ``index`` current while a decision is taken (memo miss only): the
    tuned-cache lookups and the backends' probes describe the current device."""
    if index is None or index == _cuda_current_index():
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(index)


def _config_for(op: str, k: Kernel, key) -> dict:
    cfg = None
    if _tuned_config_lookup is not None:
        cfg = _tuned_config_lookup(op, k, key)
    return dict(cfg) if cfg else dict(k.default_config(key))


def _select_uncached(op: str, key, name: str | None, source: str) -> tuple[Kernel, dict]:
    ops = _registry.get(op)
    if not ops:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_registry)}")
    if name is not None:
        k = ops.get(name)
        if k is None:
            raise ValueError(f"{source}={name!r}: op {op!r} has no {name} kernel "
                             f"(it has: {', '.join(sorted(ops, key=_PRIORITY.get))})")
        ok, why = backend_status(name)
        if not ok:
            raise ValueError(f"{source}={name!r} is not usable here: {why}")
        ok, why = k.supports(key, explicit=True) if _takes_explicit(k) else k.supports(key)
        if not ok:
            raise ValueError(f"{source}={name!r} does not support these inputs for {op}: {why}")
        return k, _config_for(op, k, key)

    if _tuned_backend_lookup is not None:
        tuned = _tuned_backend_lookup(op, key, ops)
        if tuned in ops and backend_status(tuned)[0]:
            k = ops[tuned]
            if _supports(k, key)[0]:
                return k, _config_for(op, k, key)

    reasons = []
    for bname in sorted(ops, key=_PRIORITY.get):
        k = ops[bname]
        ok, why = backend_status(bname)
        if ok:
            ok, why = _supports(k, key)
        if ok:
            return k, _config_for(op, k, key)
        reasons.append(f"{bname}: {why}")
    raise ValueError(f"no backend supports {op} for {key}: " + "; ".join(reasons))


def _takes_explicit(k: Kernel) -> bool:
    return getattr(k.supports, "takes_explicit", False)


def _supports(k: Kernel, key) -> tuple[bool, str]:
    return k.supports(key, explicit=False) if _takes_explicit(k) else k.supports(key)


def explicit_aware(fn):
    """Mark a ``supports(key, explicit)`` function: it is told whether the
    backend was asked for by name (e.g. the Triton interpreter on CPU tensors
    is only used when asked for)."""
    fn.takes_explicit = True
    return fn


def clear_memo() -> None:
    """Forget memoised decisions (after the tuned cache or environment changes)."""
    with _lock:
        _memo.clear()
        _avail_cache.clear()
    _notify_cleared()


def on_clear_memo(fn: Callable[[], None]) -> Callable[[], None]:
    """Have ``fn()`` called whenever memoised decisions are forgotten (clear_memo, register)."""
    _memo_listeners.append(fn)
    return fn


def _notify_cleared() -> None:
    for fn in list(_memo_listeners):
        fn()


def set_tuned_lookups(config_lookup=None, backend_lookup=None) -> None:
    """Install the autotuner's cache lookups (called by posattn.autotune)."""
    global _tuned_config_lookup, _tuned_backend_lookup
    _tuned_config_lookup = config_lookup
    _tuned_backend_lookup = backend_lookup
    clear_memo()


def explain(op: str, key) -> list[tuple[str, bool, str]]:
    """For each backend of ``op``: (name, would accept, reason when not)."""
    out = []
    for bname, k in sorted(kernels(op).items(), key=lambda kv: _PRIORITY[kv[0]]):
        ok, why = backend_status(bname)
        if ok:
            ok, why = _supports(k, key)
        out.append((bname, ok, why))
    return out


def verified_backends(device_type: str, index: int | None = None) -> dict[str, dict]:
    """Which backends have been verified on this kind of device, per op.

    A backend is verified for an op on a device when a tuned entry (``$POSATTN_TUNE_DIR`` or
    the user cache, written by ``posattn tune`` / ``benchmarks/gpu_check.sh`` only for configs
    that matched the fp64 reference) or a shipped config (``posattn/autotune/configs/``) of
    the current kernel version holds an ``ok`` result for this device's fingerprint / slug.

    Returns ``{backend: {"ops": [op, ...], "layers": [layer name, ...]}}`` for every backend
    with at least one such entry (the reference, being the oracle, is never listed).
    """
    from posattn import device as _device
    from posattn.autotune import cache as _cache

    dev = _device.device_for(device_type, index)
    idx = _cache.load_index(dev.fingerprint, dev.slug)
    reg = kernels()
    out: dict[str, dict] = {}
    for (op, bname, version, _items), hit in idx.exact.items():
        k = reg.get(op, {}).get(bname)
        if k is None or k.version != version or bname == "reference":
            continue
        d = out.setdefault(bname, {"ops": set(), "layers": set()})
        d["ops"].add(op)
        d["layers"].add(hit.layer)
    return {b: {"ops": sorted(d["ops"]), "layers": sorted(d["layers"])}
            for b, d in sorted(out.items(), key=lambda kv: _PRIORITY[kv[0]])}

"""Pieces every op's benchmark module uses: whether a posattn backend or a peer
library can be timed here, the dtype table lookup, and ``--shape`` parsing."""
from __future__ import annotations

import importlib.util

import torch


def posattn_available(op: str, backend: str):
    """``available(device_type)`` for posattn backend ``backend`` of ``op``: registered,
    usable in this process, and on its device (the Triton interpreter is not timed)."""
    def check(device_type: str):
        from posattn import dispatch

        if backend not in dispatch.kernels(op):
            return False, f"posattn has no {backend} kernel for {op}"
        ok, why = dispatch.backend_status(backend)
        if not ok:
            return False, why
        if backend == "cpu" and device_type != "cpu":
            return False, "CPU kernel: runs on CPU tensors only"
        if backend in ("cuda", "triton") and device_type != "cuda":
            return False, "needs a CUDA device (the Triton interpreter is not timed)"
        return True, ""
    return check


def importable(module: str, cuda_only: bool = False):
    """``available(device_type)`` for a peer library: ``module`` can be found (without importing it)."""
    def check(device_type: str):
        if cuda_only and device_type != "cuda":
            return False, "CUDA only"
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return (True, "") if found else (False, f"{module.split('.')[0]} is not installed")
    return check


def flex_available(device_type: str):
    """``available(device_type)`` for the FlexAttention peers: CUDA tensors and a torch that has it."""
    if device_type != "cuda":
        return False, "CUDA only"
    found = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return (True, "") if found else (False, "this torch has no FlexAttention")


_COMPILED_FLEX: list = []


def compiled_flex():
    """``torch.compile(flex_attention)``, compiled once per process and shared by the Flex peers."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


def dtypes_from(table: dict):
    """``dtypes(mode, device_type)`` from {(mode, device_type): dtype names}."""
    def dtypes(mode: str, device_type: str):
        return [getattr(torch, n) for n in table[(mode, device_type)]]
    return dtypes


def parse_dims(text: str, op: str, names: tuple[str, ...], example: str) -> dict[str, int]:
    """``"B=1,S=4096"`` -> {"B": 1, "S": 4096}; every name must be one of ``names``."""
    try:
        dims = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"--shape for {op} must look like {example}; got {text!r}") from None
    unknown = set(dims) - set(names)
    if unknown:
        raise ValueError(f"--shape for {op}: unknown dimension(s) {sorted(unknown)}; use {', '.join(names)}")
    return dims


def flashinfer_fn(name: str):
    """A FlashInfer rope function (in ``flashinfer.rope``, or at the top level in older releases)."""
    import importlib

    for module in ("flashinfer.rope", "flashinfer"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"cannot import {name} from flashinfer.rope or flashinfer")


def as_qk(q: torch.Tensor, k: torch.Tensor):
    """``outputs -> (q-shaped, k-shaped)``: a peer's flattened (q, k) outputs viewed back as q and k."""
    return lambda out: (out[0].view(q.shape), out[1].view(k.shape))


def attention_nbytes(shape, dtype) -> int:
    """Bytes an attention forward must move: q, k, v read and out written (dims T, Hq, Hk, D),
    plus the fp32 lse."""
    d = shape.dims
    esize = torch.empty((), dtype=dtype).element_size()
    return esize * d["T"] * d["D"] * (2 * d["Hq"] + 2 * d["Hk"]) + 4 * d["Hq"] * d["T"]

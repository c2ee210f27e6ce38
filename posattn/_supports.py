"""The ``supports(key)`` rules that the serving ops' kernel registrations share.

A kernel key carries ``device_type`` and ``dtype`` (a dtype name). Each factory returns a
function for ``dispatch.register(..., supports=...)``; ``dtypes=None`` accepts every dtype.
"""
from __future__ import annotations

import importlib

from posattn import dispatch

NATIVE = ("float32", "float16", "bfloat16")


def cpu(dtypes: tuple[str, ...] | None = None, refusal: str = ""):
    """The C++ CPU kernels: CPU tensors of ``dtypes``; ``refusal`` says why another dtype is not."""

    def supports(key):
        if key.device_type != "cpu":
            return False, f"needs CPU tensors, got {key.device_type}"
        if dtypes is not None and key.dtype not in dtypes:
            return False, f"dtype {key.dtype}: {refusal}"
        return True, ""

    return supports


def triton(dtypes: tuple[str, ...] | None = None, refusal: str = ""):
    """The Triton kernels: CUDA tensors, or CPU tensors in the interpreter when asked for by name
    (kernels.triton.device_refusal), of ``dtypes``."""

    @dispatch.explicit_aware
    def supports(key, explicit: bool = False):
        from posattn.kernels import triton as tk

        why = tk.device_refusal(key.device_type, explicit)
        if why:
            return False, why
        if dtypes is not None and key.dtype not in dtypes:
            return False, f"dtype {key.dtype}: {refusal}"
        return True, ""

    return supports


def lazy(module: str, attr: str):
    """``key -> module.attr(key)``, importing ``module`` on first use (a Triton kernel module
    compiles nothing at import, but importing triton costs time that a CPU user need not pay)."""

    def call(key):
        return getattr(importlib.import_module(module), attr)(key)

    return call

"""Triton kernels, one module per kernel family.

Under ``TRITON_INTERPRET=1`` (set by the tests on machines without a GPU,
before this package is imported) the kernels run on CPU tensors through
Triton's interpreter; otherwise they need CUDA tensors.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency on Linux
        return False, f"triton is not importable ({e})"
    if interpreting():
        return True, "interpreter (TRITON_INTERPRET=1): runs on CPU tensors"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU, slowly)"
    return True, ""


def device_ok(device_type: str) -> bool:
    """Whether Triton kernels can take tensors of this device type in this process."""
    return device_type == "cuda" or (device_type == "cpu" and interpreting())


def device_refusal(device_type: str, explicit: bool) -> str:
    """Why a Triton kernel does not take tensors of this device type ("" when it does): the
    rule every op's ``supports`` shares (on CPU tensors only the interpreter, and only when
    the Triton backend is asked for by name)."""
    if not device_ok(device_type):
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device_type}"
    if device_type == "cpu" and not explicit:
        return "the Triton interpreter is only used on CPU tensors when asked for by name"
    return ""

"""Tolerances per dtype, in one place. Never widened to make a test pass.

Outputs are compared with the fp64 reference after one rounding to the output
dtype, so the budget is about one ulp of the output dtype at the magnitude of
the values plus fp32 compute error. Under the Triton interpreter the
fp32->bf16 cast truncates instead of rounding, which DESIGN.md allows as one
bf16 ulp: bf16's budget below already is one ulp (2^-8 relative).
"""
import torch

# (atol, rtol) for elementwise ops with O(1) values
ELEMENTWISE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def tol(dtype: torch.dtype, kind: str = "elementwise") -> dict:
    table = {"elementwise": ELEMENTWISE}[kind]
    atol, rtol = table[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 kind: str = "elementwise", msg: str = "") -> None:
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               **tol(dtype, kind), msg=(lambda m: f"{msg}\n{m}") if msg else None)

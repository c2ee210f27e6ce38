"""Tolerances in one place. Never widened to make a test pass.

Elementwise ops (rotary embedding and the like) are compared with the fp64 reference after one
rounding to the output dtype: about one ulp of the output dtype at the magnitude of the
values, plus fp32 compute error (ELEMENTWISE). Under the Triton interpreter the fp32->bf16
cast may truncate instead of rounding: one bf16 ulp (2^-8 relative), within bf16's budget.

Attention is compared with an fp64 oracle evaluated on the same inputs (for fused RoPE in
16-bit, on the same rounded rotated q/k) against elementwise bounds derived from each case's
inputs (tests/attention/oracle.py: bounds): the budget follows the values that enter each
output, so that a wrong key is not hidden in a fixed tolerance. :func:`assert_within` checks them.
"""
import torch

# (atol, rtol) for elementwise ops with O(1) values
ELEMENTWISE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# (atol, rtol) of an fp64 computation against the fp64 oracle (reassociated sums only)
FP64 = (1e-10, 1e-10)


def tol(dtype: torch.dtype, kind: str = "elementwise") -> dict:
    if kind == "fp64":
        return {"atol": FP64[0], "rtol": FP64[1]}
    atol, rtol = ELEMENTWISE[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 kind: str = "elementwise", msg: str = "") -> None:
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               **tol(dtype, kind), msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, msg: str = "") -> float:
    """|actual - expected| <= bound elementwise (inf == inf allowed); returns the largest
    ratio |actual - expected| / bound, for reporting how tight a bound is."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    b = bound.detach().to(torch.float64).cpu()
    same = (a == e) | (a.isnan() & e.isnan())
    err = torch.where(same, torch.zeros_like(a), (a - e).abs())
    ratio = torch.where(err == 0, torch.zeros_like(err), err / b)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if not worst <= 1.0:
        i = int(ratio.flatten().argmax())
        raise AssertionError(f"{msg}: |actual - expected| exceeds the derived bound by {worst:.3g}x at flat "
                             f"index {i}: actual {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
                             f"bound {b.flatten()[i].item()!r}")
    return worst

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


# (atol, rtol) for attention outputs and log-sum-exp (O(1) values) against the fp64 reference
# computed from the same inputs. Beyond the output rounding, a flash-attention kernel rounds
# the rotated q/k (in-kernel RoPE) and the probabilities P to the input dtype before its
# tensor-core products (P @ V), as apply_rope-then-attention does: about three ulps of the
# input dtype in all; fp32 runs exact-fp32 products (no TF32) and exp2 with log2e-scaled scores.
ATTENTION = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# (atol, rtol) for attention gradients dq, dk, dv: dS and P are also rounded to the input
# dtype before dS @ K, dS^T @ Q and P^T @ dO, and each gradient sums over keys or queries,
# so one more rounding than ATTENTION (twice its budget).
ATTENTION_GRAD = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (8e-3, 8e-3),
    torch.bfloat16: (6e-2, 6e-2),
}


def tol(dtype: torch.dtype, kind: str = "elementwise") -> dict:
    table = {"elementwise": ELEMENTWISE, "attention": ATTENTION, "attention_grad": ATTENTION_GRAD}[kind]
    atol, rtol = table[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 kind: str = "elementwise", msg: str = "") -> None:
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(),
                               **tol(dtype, kind), msg=(lambda m: f"{msg}\n{m}") if msg else None)

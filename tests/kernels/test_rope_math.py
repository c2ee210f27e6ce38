"""The shared header math (csrc/include/posattn/rope_math.h) through posattn._C:
exact angle reduction and the branch-free host sincos."""
import math
from fractions import Fraction

import pytest
import torch

from posattn.kernels import cpu as cpu_kernels

_C = cpu_kernels._C
pytestmark = pytest.mark.skipif(_C is None, reason="posattn._C is not built")

PI = Fraction("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899862803482534211706798")


def _exact_reduced(pos: int, f: float) -> float:
    x = pos * Fraction(f)
    x -= 2 * PI * round(x / (2 * PI))
    return float(x)


@pytest.mark.parametrize("pos", [0, 1, 4095, 4096, 10**6 + 7, 2**24 + 1, 2**31 - 1, 2**31, -(10**6)])
def test_reduce_is_exact(pos):
    for f in (1.0, 0.7498942, 1e-4, float(torch.tensor(1 / 10000 ** (62 / 128), dtype=torch.float32))):
        f = float(torch.tensor(f, dtype=torch.float32))  # an fp32 inv_freq
        got = _C.rope_reduce(float(pos), f)
        want = _exact_reduced(pos, f)
        assert -math.pi - 1e-12 <= got <= math.pi + 1e-12
        d = (got - want + math.pi) % (2 * math.pi) - math.pi
        assert abs(d) < 1e-13, (pos, f, got, want)
        assert abs(_C.rope_angle(float(pos), f) - got) <= 2.4e-7


def test_sincos_poly():
    worst = 0.0
    for i in range(-4000, 4001):
        r = i * math.pi / 4000
        s, c = _C.rope_sincos(r)
        worst = max(worst, abs(s - math.sin(r)), abs(c - math.cos(r)))
    assert worst < 1e-13

"""Rotary angle accuracy at large positions: max |angle - exact| (rad, modulo 2*pi).

    PYTHONPATH=. python benchmarks/angle_accuracy.py [--markdown]

For head_dim 128 (64 fp32 inv_freq values, bases 1e4 and 5e5) and 64 consecutive
positions starting at 1e3, 1e6, 2^24 and 2^31, compares the angle each method
feeds to sin/cos with the exact angle:

- fp32 naive: float32(position) * inv_freq in fp32 (what transformers' rotary does);
- fp64 product: position * inv_freq rounded once in fp64, then reduced mod 2*pi;
- posattn fp64: posattn's reduction (rope_math.h, the CPU kernels' angle);
- posattn fp32: that angle rounded to fp32 in [-pi, pi] (what the CUDA and Triton
  kernels pass to sincosf).

The exact reference uses Python's integers and fractions: an integer position and
an fp32 inv_freq are exact rationals, so their product is exact; only 2*pi is
approximated, by a 100-digit decimal of pi, whose error times the number of turns
(< 4e8) stays below 1e-90 rad. No floating point is involved in the reference.

Exits 1 when posattn's fp32 angle errs by 1e-6 rad or more anywhere (the goal).
"""
from __future__ import annotations

import argparse
import sys
from fractions import Fraction

import numpy as np

PI_100 = Fraction("3.1415926535897932384626433832795028841971693993751058209749445923078164062862089986280348253421170679")
TWO_PI = 2 * PI_100
POSITIONS = {"1e3": 1000, "1e6": 10**6, "2^24": 2**24, "2^31": 2**31}
SPAN = 64


def inv_freqs(head_dim: int, base: float) -> np.ndarray:
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


def wrapped_error(angle: float, exact: Fraction) -> float:
    """|angle - exact| modulo 2*pi, in [0, pi] (exact arithmetic, then one rounding)."""
    d = Fraction(angle) - exact
    d -= TWO_PI * round(d / TWO_PI)
    return abs(float(d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    args = ap.parse_args(argv)
    from posattn import _C

    freqs = np.concatenate([inv_freqs(128, 1e4), inv_freqs(128, 5e5)])
    cols = ("fp32 naive", "fp64 product", "posattn fp64", "posattn fp32")
    table = {}
    for label, p0 in POSITIONS.items():
        worst = dict.fromkeys(cols, 0.0)
        for pos in range(p0, p0 + SPAN):
            for f in freqs:
                exact = pos * Fraction(float(f))
                naive = float(np.float32(np.float32(pos) * f))
                prod64 = float(pos) * float(f)
                prod64 = prod64 - 2 * np.pi * np.floor(prod64 / (2 * np.pi))
                ours64 = _C.rope_reduce(float(pos), float(f))
                ours32 = _C.rope_angle(float(pos), float(f))
                for c, a in zip(cols, (naive, prod64, ours64, ours32)):
                    worst[c] = max(worst[c], wrapped_error(a, exact))
        table[label] = worst

    if args.markdown:
        print("| position | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for label, w in table.items():
            print(f"| {label} | " + " | ".join(f"{w[c]:.1e}" for c in cols) + " |")
    else:
        print(f"max |angle error| (rad) over {SPAN} positions from each start x {len(freqs)} inv_freq "
              f"(head_dim 128, bases 1e4 and 5e5)")
        print(f"{'position':>10} " + " ".join(f"{c:>14}" for c in cols))
        for label, w in table.items():
            print(f"{label:>10} " + " ".join(f"{w[c]:14.2e}" for c in cols))
    worst = max(w["posattn fp32"] for w in table.values())
    ok = worst < 1e-6
    print(("PASS" if ok else "FAIL") + f": posattn fp32 angle error <= {worst:.2e} rad (goal < 1e-6)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

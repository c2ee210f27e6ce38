"""Triton cos/sin table of one call: ``table[0, t, p] = a cos(theta)``, ``table[1, t, p] = a sin(theta)``.

    theta = positions[t] * inv_freq[p]  reduced modulo 2*pi exactly in fp64 by the rotary
            kernel's own routine (rope._reduced_angle: position split at 4096, two-part 2*pi),
            rounded to fp32, then fp32 cos/sin; a = attention_scaling (an fp32 product)

These are bit for bit the cos/sin the Triton rotary kernel (``apply_rope``) multiplies by,
so attention that reads the table rotates q and k exactly as ``apply_rope`` does. The fp64
work is done once per token and pair, not once per key-tile visit.

Grid: (cdiv(T, BLOCK_T),); each program fills BLOCK_T tokens x all R/2 pairs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton.rope import _reduced_angle


@triton.jit
def _rope_table_kernel(POS, INV_FREQ, OUT, T, attention_scaling,
                       HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    p = tl.arange(0, BLOCK_P)
    tmask = t < T
    pmask = p < HALF
    pos = tl.load(POS + t, mask=tmask, other=0).to(tl.float64)
    f = tl.load(INV_FREQ + p, mask=pmask, other=0.0).to(tl.float64)
    theta = _reduced_angle(pos[:, None], f[None, :]).to(tl.float32)
    off = t[:, None] * HALF + p[None, :]
    m = tmask[:, None] & pmask[None, :]
    tl.store(OUT + off, tl.cos(theta) * attention_scaling, mask=m)
    tl.store(OUT + T.to(tl.int64) * HALF + off, tl.sin(theta) * attention_scaling, mask=m)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
               out: torch.Tensor) -> torch.Tensor:
    """positions [T] (int32/int64/fp32/fp64, contiguous); inv_freq fp32 [R/2]; out fp32 [2, T, R/2]."""
    T, half = out.shape[1], out.shape[2]
    if T == 0 or half == 0:
        return out
    block_p = triton.next_power_of_2(half)
    block_t = max(1, min(64, 4096 // block_p))
    _rope_table_kernel[(triton.cdiv(T, block_t),)](positions, inv_freq, out, T, float(attention_scaling),
                                                   HALF=half, BLOCK_T=block_t, BLOCK_P=block_p, num_warps=4)
    return out


def aot_specializations():
    """(name, kernel, signature, constexprs, num_warps, num_stages) of the table kernel for AOT tests."""
    for pos_t in ("i32", "i64", "fp32"):
        for half in (64, 40):
            sig = {"POS": f"*{pos_t}", "INV_FREQ": "*fp32", "OUT": "*fp32", "T": "i32", "attention_scaling": "fp32",
                   "HALF": "constexpr", "BLOCK_T": "constexpr", "BLOCK_P": "constexpr"}
            bp = triton.next_power_of_2(half)
            yield (f"rope_table_{pos_t}_h{half}", _rope_table_kernel, sig,
                   {"HALF": half, "BLOCK_T": max(1, min(64, 4096 // bp)), "BLOCK_P": bp}, 4, 1)

"""What the two Triton rotary kernels share: the rotation of one token's block
of heads, and their launch configs (heuristic default and autotune search
space). Both kernels (``rope.py``: angles from positions; ``rope_cos_sin.py``:
angles from tables) run one program per (token, block of BLOCK_H heads) over a
[BLOCK_H, BLOCK_P] tile of rotary pairs, so one config space serves both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_heads(xin, xout, p, pmask, hmask, cos1, sin1, cos2, sin2,
                 HALF: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                 INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr):
    """Rotate a block of heads of one token and store it (rounded once, to the output's dtype).

    xin/xout: [BLOCK_H, 1] pointers to each head's first element; p: [BLOCK_P] pair
    indices; cos*/sin*: fp32 (or fp64: then the math is fp64), broadcastable to [BLOCK_H, BLOCK_P]:
        o1 = x1 cos1 - x2 sin1 ; o2 = x2 cos2 + x1 sin2
    half-split pairs (p, p + HALF), interleaved pairs (2p, 2p + 1); with COPY_TAIL the
    dims past 2*HALF are copied unrotated.
    """
    if INTERLEAVED:
        i1 = 2 * p
        i2 = 2 * p + 1
    else:
        i1 = p
        i2 = p + HALF
    m = hmask[:, None] & pmask[None, :]
    # the compute type is the tables' (fp32; fp64 for fp64 inputs in rope_cos_sin)
    x1 = tl.load(xin + i1[None, :], mask=m, other=0.0).to(cos1.dtype)
    x2 = tl.load(xin + i2[None, :], mask=m, other=0.0).to(cos1.dtype)
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2
    tl.store(xout + i1[None, :], o1.to(xout.dtype.element_ty), mask=m)
    tl.store(xout + i2[None, :], o2.to(xout.dtype.element_ty), mask=m)
    if COPY_TAIL:
        t = 2 * HALF + tl.arange(0, BLOCK_T)
        tm = hmask[:, None] & (t < D)[None, :]
        xt = tl.load(xin + t[None, :], mask=tm, other=0.0)
        tl.store(xout + t[None, :], xt, mask=tm)


# ---------------------------------------------------------------------------
# launch: grid, q/k arguments and the tile's constexprs

@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int]   # (B*S tokens, head blocks of q then of k)
    S: int
    HQ: int
    HK: int
    NQB: int                # head blocks of q
    tensors: tuple          # (q, qo, k, ko); a missing side is replaced by the other (never read)
    strides: tuple          # (b, s, h) strides of q, qo, k, ko: the kernels' q_sb ... ko_sh
    meta: dict              # tile_meta(...)
    num_warps: int


def _heads(x) -> int:
    return 0 if x is None else x.shape[2]


def plan(q, qo, k, ko, rotary_dim: int, interleaved: bool, config: dict) -> Launch | None:
    """How to launch a rotary kernel on [B, S, H, D] q/k (either may be None or have no
    heads); None when there is nothing to rotate."""
    x = q if _heads(q) else k
    if x is None or _heads(x) == 0:
        return None
    xo = qo if x is q else ko
    B, S, _, D = x.shape
    if B * S == 0:
        return None
    HQ, HK = _heads(q), _heads(k)
    block_h = int(config.get("BLOCK_H") or default_config(D, rotary_dim, max(HQ, HK))["BLOCK_H"])
    nqb, nkb = triton.cdiv(HQ, block_h), triton.cdiv(HK, block_h)
    tensors = ((q, qo) if HQ else (x, xo)) + ((k, ko) if HK else (x, xo))
    strides = tuple(st for t in tensors for st in (t.stride(0), t.stride(1), t.stride(2)))
    copy_tail = rotary_dim < D and xo.data_ptr() != x.data_ptr()
    return Launch((B * S, nqb + nkb), S, HQ, HK, nqb, tensors, strides,
                  tile_meta(D, rotary_dim, interleaved, copy_tail, block_h), int(config.get("num_warps", 4)))


def tile_meta(head_dim: int, rotary_dim: int, interleaved: bool, copy_tail: bool, block_h: int) -> dict:
    """The constexprs both kernels take: HALF, D, BLOCK_P, BLOCK_H, BLOCK_T, INTERLEAVED, COPY_TAIL."""
    half = rotary_dim // 2
    return dict(HALF=half, D=head_dim, BLOCK_P=triton.next_power_of_2(max(half, 1)), BLOCK_H=block_h,
                BLOCK_T=triton.next_power_of_2(max(head_dim - rotary_dim, 1)), INTERLEAVED=bool(interleaved),
                COPY_TAIL=bool(copy_tail))


# ahead-of-time signatures
TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
QK_STRIDE_ARGS = ("q_sb", "q_ss", "q_sh", "qo_sb", "qo_ss", "qo_sh", "k_sb", "k_ss", "k_sh",
                  "ko_sb", "ko_ss", "ko_sh")


def qk_signature(ty: str) -> dict:
    """Signature entries of q, qo, k, ko (pointers to ``ty``) and their strides (i64)."""
    sig = {n: f"*{ty}" for n in ("q_ptr", "qo_ptr", "k_ptr", "ko_ptr")}
    sig.update({n: "i64" for n in QK_STRIDE_ARGS})
    return sig


# ---------------------------------------------------------------------------
# launch configs: {BLOCK_H, num_warps}

def default_config(head_dim: int, rotary_dim: int, heads: int) -> dict:
    block_p = triton.next_power_of_2(max(rotary_dim // 2, 1))
    # keep a program's tile near 2k pairs: enough work per program, few registers
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), max(1, 2048 // block_p)))
    return {"BLOCK_H": block_h, "num_warps": 4 if block_h * block_p >= 1024 else 2}


def search_space(key) -> list[dict]:
    """Candidate {BLOCK_H, num_warps} (``key``: a kernel key with heads_q, heads_k, rotary_dim)."""
    return [c for c in ({"BLOCK_H": bh, "num_warps": w} for bh in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8))
            if config_ok(key, c)]


def config_ok(key, config: dict) -> bool:
    """Prune: no block taller than the heads, no tile past 8k pairs (registers),
    no more warps than the tile has rows of 32 pairs."""
    heads = max(int(key.heads_q), int(key.heads_k), 1)
    block_p = triton.next_power_of_2(max(int(key.rotary_dim) // 2, 1))
    bh, w = config["BLOCK_H"], config["num_warps"]
    if bh > triton.next_power_of_2(heads):
        return False
    tile = bh * block_p
    return tile <= 8192 and w * 32 <= max(32, tile)

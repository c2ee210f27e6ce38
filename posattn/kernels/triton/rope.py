"""Triton rotary kernel (forward; the backward is the same kernel at -theta).

Grid: (B*S tokens, head blocks of q then of k). Each program loads one
token's position, computes theta = position * inv_freq in fp64 reduced
modulo 2*pi, takes fp32 cos/sin, and rotates BLOCK_H heads:

    out1 = x1 cos - x2 sin ; out2 = x2 cos + x1 sin
    half-split pairs (p, p + R/2), interleaved pairs (2p, 2p + 1)

Inputs are loaded in their dtype, converted to fp32 at once and rounded once
at the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TWO_PI = 6.283185307179586
INV_TWO_PI = 0.15915494309189535


@triton.jit
def _rope_fwd_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, pos_ptr, inv_freq_ptr,
    S, HQ, HK, NQB,
    q_sb, q_ss, q_sh, qo_sb, qo_ss, qo_sh,
    k_sb, k_ss, k_sh, ko_sb, ko_ss, ko_sh,
    pos_sb, pos_ss,
    HALF: tl.constexpr, D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr, SIGN: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // S
    s = tok - b * S
    pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.float64)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    inv_freq = tl.load(inv_freq_ptr + p, mask=pmask, other=0.0).to(tl.float64)
    theta = pos * inv_freq
    theta = theta - tl.floor(theta * INV_TWO_PI) * TWO_PI
    theta32 = theta.to(tl.float32)
    cos = tl.cos(theta32)
    sin = tl.sin(theta32) * SIGN

    if hb < NQB:
        x_ptr = q_ptr
        o_ptr = qo_ptr
        h0 = hb * BLOCK_H
        H = HQ
        sb, ss, sh = q_sb, q_ss, q_sh
        osb, oss, osh = qo_sb, qo_ss, qo_sh
    else:
        x_ptr = k_ptr
        o_ptr = ko_ptr
        h0 = (hb - NQB) * BLOCK_H
        H = HK
        sb, ss, sh = k_sb, k_ss, k_sh
        osb, oss, osh = ko_sb, ko_ss, ko_sh

    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    hmask = h < H
    if INTERLEAVED:
        i1 = 2 * p
        i2 = 2 * p + 1
    else:
        i1 = p
        i2 = p + HALF
    m = hmask[:, None] & pmask[None, :]
    xin = x_ptr + b * sb + s * ss + h[:, None] * sh
    xout = o_ptr + b * osb + s * oss + h[:, None] * osh
    x1 = tl.load(xin + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xin + i2[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(xout + i1[None, :], o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(xout + i2[None, :], o2.to(o_ptr.dtype.element_ty), mask=m)
    if COPY_TAIL:
        t = 2 * HALF + tl.arange(0, BLOCK_T)
        tm = hmask[:, None] & (t < D)[None, :]
        xt = tl.load(xin + t[None, :], mask=tm, other=0.0)
        tl.store(xout + t[None, :], xt, mask=tm)


def default_config(head_dim: int, rotary_dim: int, heads: int) -> dict:
    block_p = triton.next_power_of_2(max(rotary_dim // 2, 1))
    # keep a program's tile near 2k pairs: enough work per program, few registers
    block_h = max(1, min(triton.next_power_of_2(max(heads, 1)), max(1, 2048 // block_p)))
    return {"BLOCK_H": block_h, "num_warps": 4 if block_h * block_p >= 1024 else 2}


def _launch_meta(q, k, rotary_dim, interleaved, copy_tail, config, sign):
    half = rotary_dim // 2
    d = q.shape[3]
    block_h = int(config.get("BLOCK_H") or default_config(d, rotary_dim, max(q.shape[2], k.shape[2] if k is not None else 0))["BLOCK_H"])
    tail = d - rotary_dim
    return dict(
        HALF=half, D=d, BLOCK_P=triton.next_power_of_2(max(half, 1)), BLOCK_H=block_h,
        BLOCK_T=triton.next_power_of_2(max(tail, 1)), INTERLEAVED=bool(interleaved),
        COPY_TAIL=bool(copy_tail), SIGN=float(sign), num_warps=int(config.get("num_warps", 4)),
    )


def rope_forward(q, qo, k, ko, pos2, inv_freq, rotary_dim: int, interleaved: bool, config: dict,
                 sign: float = 1.0):
    """Same contract as posattn.kernels.cpu.rope_forward; ``sign=-1`` rotates by -theta."""
    B, S, HQ, D = q.shape
    HK = k.shape[2] if k is not None else 0
    copy_tail = rotary_dim < D and qo.data_ptr() != q.data_ptr()
    meta = _launch_meta(q, k, rotary_dim, interleaved, copy_tail, config, sign)
    nqb = triton.cdiv(HQ, meta["BLOCK_H"])
    nkb = triton.cdiv(HK, meta["BLOCK_H"]) if k is not None else 0
    if B * S == 0:
        return
    kk, kko = (k, ko) if k is not None else (q, qo)
    pb = 0 if pos2.shape[0] == 1 else pos2.stride(0)
    grid = (B * S, nqb + nkb)
    _rope_fwd_kernel[grid](
        q, qo, kk, kko, pos2, inv_freq,
        S, HQ, HK, nqb,
        q.stride(0), q.stride(1), q.stride(2), qo.stride(0), qo.stride(1), qo.stride(2),
        kk.stride(0), kk.stride(1), kk.stride(2), kko.stride(0), kko.stride(1), kko.stride(2),
        pb, pos2.stride(1),
        **meta,
    )


# ---------------------------------------------------------------------------
# ahead-of-time compilation (tests compile every specialisation for sm_90a/sm_80)

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specializations(head_dims=(64, 80, 96, 128, 256), dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Yield (name, kernel, signature, constexprs, num_warps) for ahead-of-time compiles."""
    for d in head_dims:
        for rot in sorted({d, d // 2 if (d // 2) % 2 == 0 else d}):
            for dtype in dtypes:
                for inter in (False, True):
                    for pos_t in ("i32", "i64"):
                        ty = _TL_DTYPE[dtype]
                        cfg = default_config(d, rot, 32)
                        meta = dict(HALF=rot // 2, D=d, BLOCK_P=triton.next_power_of_2(rot // 2),
                                    BLOCK_H=cfg["BLOCK_H"], BLOCK_T=triton.next_power_of_2(max(d - rot, 1)),
                                    INTERLEAVED=inter, COPY_TAIL=rot < d, SIGN=1.0)
                        sig = {n: "constexpr" for n in meta}
                        sig.update({"q_ptr": f"*{ty}", "qo_ptr": f"*{ty}", "k_ptr": f"*{ty}",
                                    "ko_ptr": f"*{ty}", "pos_ptr": f"*{pos_t}", "inv_freq_ptr": "*fp32"})
                        for n in ("S", "HQ", "HK", "NQB", "q_sb", "q_ss", "q_sh", "qo_sb", "qo_ss", "qo_sh",
                                  "k_sb", "k_ss", "k_sh", "ko_sb", "ko_ss", "ko_sh", "pos_sb", "pos_ss"):
                            sig[n] = "i64" if n.endswith(("sb", "ss", "sh")) else "i32"
                        name = f"rope_fwd_d{d}_r{rot}_{ty}_{'inter' if inter else 'half'}_{pos_t}"
                        yield name, _rope_fwd_kernel, sig, meta, cfg["num_warps"]


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

def rope_search_space(key) -> list[dict]:
    """Candidate {BLOCK_H, num_warps} for the rope kernel (``key``: the rope kernel key)."""
    return [c for c in ({"BLOCK_H": bh, "num_warps": w} for bh in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8))
            if rope_config_ok(key, c)]


def rope_config_ok(key, config: dict) -> bool:
    """Prune: no block taller than the heads, no tile past 8k pairs (registers),
    no more warps than the tile has rows of 32 pairs."""
    heads = max(int(key.heads_q), int(key.heads_k), 1)
    block_p = triton.next_power_of_2(max(int(key.rotary_dim) // 2, 1))
    bh, w = config["BLOCK_H"], config["num_warps"]
    if bh > triton.next_power_of_2(heads):
        return False
    tile = bh * block_p
    return tile <= 8192 and w * 32 <= max(32, tile)

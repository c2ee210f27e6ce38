"""Triton rotary kernel reading precomputed cos/sin tables (forward; the
backward is the same kernel with the sines negated and swapped).

Grid: (B*S tokens, head blocks of q then of k). Each program finds its
token's table row (``positions[b, s]`` in the cache form, ``s`` in the
per-token form), loads the row's cos/sin once in the table's dtype, converts
them to the compute type (fp32; fp64 for fp64 q/k, FP64: nothing of an fp64
input passes through fp32) and rotates BLOCK_H heads:

    o1 = x1 cos1 - x2 sin1 ; o2 = x2 cos2 + x1 sin2
    half-split pairs (p, p + R/2), interleaved pairs (2p, 2p + 1)

cos2/sin2 are only loaded when they differ from cos1/sin1 (SPLIT: the
transformers-style [.., R] tables). A row outside [0, N) gives NaN in the
rotated dims; the table is never read outside its bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton.rope_common import (TL_DTYPE, config_ok, default_config, plan, qk_signature,
                                                rotate_heads, search_space, tile_meta)


@triton.jit
def _rope_cos_sin_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, c1_ptr, s1_ptr, c2_ptr, s2_ptr, pos_ptr,
    S, HQ, HK, NQB, N,
    q_sb, q_ss, q_sh, qo_sb, qo_ss, qo_sh,
    k_sb, k_ss, k_sh, ko_sb, ko_ss, ko_sh,
    c_sb, c_sn, c_sp, s_sb, s_sn, s_sp,
    pos_sb, pos_ss,
    HALF: tl.constexpr, D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr, SIGN: tl.constexpr,
    HAS_POS: tl.constexpr, SPLIT: tl.constexpr, FP64: tl.constexpr = False,
):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // S
    s = tok - b * S
    if HAS_POS:
        row = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.int64)
    else:
        row = s
    valid = (row >= 0) & (row < N)
    row = tl.where(valid, row, 0)
    p = tl.arange(0, BLOCK_P)
    pmask = p < HALF
    lm = pmask & valid
    co = b * c_sb + row * c_sn + p * c_sp
    so = b * s_sb + row * s_sn + p * s_sp
    cos1 = tl.load(c1_ptr + co, mask=lm, other=0.0).to(tl.float64 if FP64 else tl.float32)
    sin1 = tl.load(s1_ptr + so, mask=lm, other=0.0).to(tl.float64 if FP64 else tl.float32) * SIGN
    if SPLIT:
        cos2 = tl.load(c2_ptr + co, mask=lm, other=0.0).to(tl.float64 if FP64 else tl.float32)
        sin2 = tl.load(s2_ptr + so, mask=lm, other=0.0).to(tl.float64 if FP64 else tl.float32) * SIGN
    else:
        cos2 = cos1
        sin2 = sin1
    nan = float("nan")
    cos1 = tl.where(valid, cos1, nan)
    cos2 = tl.where(valid, cos2, nan)

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
    rotate_heads(x_ptr + b * sb + s * ss + h[:, None] * sh, o_ptr + b * osb + s * oss + h[:, None] * osh,
                 p, pmask, hmask, cos1[None, :], sin1[None, :], cos2[None, :], sin2[None, :],
                 HALF, D, BLOCK_T, INTERLEAVED, COPY_TAIL)


def rope_cos_sin_forward(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim: int, interleaved: bool,
                         sign: float, config: dict):
    """Same contract as posattn.kernels.rope_cos_sin_native.cpu_forward."""
    L = plan(q, qo, k, ko, rotary_dim, interleaved, config)
    if L is None:
        return
    split = c2.data_ptr() != c1.data_ptr() or s2.data_ptr() != s1.data_ptr()
    has_pos = pos2 is not None
    pos = pos2 if has_pos else c1
    pb = (0 if pos2.shape[0] == 1 else pos2.stride(0)) if has_pos else 0
    ps = pos2.stride(1) if has_pos else 0
    cb = 0 if c1.shape[0] == 1 else c1.stride(0)
    sb = 0 if s1.shape[0] == 1 else s1.stride(0)
    _rope_cos_sin_kernel[L.grid](
        *L.tensors, c1, s1, c2, s2, pos,
        L.S, L.HQ, L.HK, L.NQB, c1.shape[1],
        *L.strides,
        cb, c1.stride(1), c1.stride(2), sb, s1.stride(1), s1.stride(2),
        pb, ps,
        SIGN=float(sign), HAS_POS=has_pos, SPLIT=bool(split), FP64=q.dtype == torch.float64,
        num_warps=L.num_warps, **L.meta,
    )


# ---------------------------------------------------------------------------
# ahead-of-time compilation (tests compile specialisations for sm_90a/sm_80)

_AOT_DTYPE = {**TL_DTYPE, torch.float64: "fp64"}


def aot_specializations(head_dims=(64, 92, 128, 160),
                        dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        table_dtypes=("fp32", "bf16")):
    """Yield (name, kernel, signature, constexprs, num_warps) for ahead-of-time compiles."""
    for d in head_dims:
        for rot in sorted({d, d // 2 if (d // 2) % 2 == 0 else d}):
            for dtype in dtypes:
                for tdt in table_dtypes:
                    for inter, has_pos, split, pos_t in ((False, True, False, "i64"), (True, True, False, "i32"),
                                                         (False, False, True, "i64"), (True, False, True, "i64")):
                        ty = _AOT_DTYPE[dtype]
                        cfg = default_config(d, rot, 32)
                        meta = dict(tile_meta(d, rot, inter, rot < d, cfg["BLOCK_H"]), SIGN=1.0, HAS_POS=has_pos,
                                    SPLIT=split, FP64=dtype == torch.float64)
                        sig = {n: "constexpr" for n in meta}
                        sig.update(qk_signature(ty))
                        sig.update({"c1_ptr": f"*{tdt}", "s1_ptr": f"*{tdt}", "c2_ptr": f"*{tdt}",
                                    "s2_ptr": f"*{tdt}", "pos_ptr": f"*{pos_t}" if has_pos else f"*{tdt}"})
                        for n in ("S", "HQ", "HK", "NQB", "N"):
                            sig[n] = "i32"
                        for n in ("c_sb", "c_sn", "c_sp", "s_sb", "s_sn", "s_sp", "pos_sb", "pos_ss"):
                            sig[n] = "i64"
                        name = (f"rope_cos_sin_d{d}_r{rot}_{ty}_t{tdt}_{'inter' if inter else 'half'}"
                                f"_{'pos' + pos_t if has_pos else 'tok'}{'_split' if split else ''}")
                        yield name, _rope_cos_sin_kernel, sig, meta, cfg["num_warps"]


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry):
# the same {BLOCK_H, num_warps} tile as the rope kernel

rope_cos_sin_search_space = search_space
rope_cos_sin_config_ok = config_ok

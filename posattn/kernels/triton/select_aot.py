"""Ahead-of-time signatures of token selection's Triton kernels (tests/select/test_select_aot.py
compiles them for sm_90a without a GPU): scores (post- and pre-RoPE keys, kv_group's G = 1), the
soft-vote passes, top-k (radix select) and Quest page scores. Strides are i64, as in
flash_attn_aot: the address arithmetic must hold for any stride."""
from __future__ import annotations

import torch
import triton

from posattn.kernels.triton.select_pages import _page_scores_fwd
from posattn.kernels.triton.select_scores import _scores_fwd, _vote_stats, _vote_sum
from posattn.kernels.triton.select_topk import _topk_kernel

TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_I32_PTRS = ("BT", "CS", "LEN", "OUT_I", "PID")
_FP32_PTRS = ("Q", "KT", "OUT", "X", "M", "IL", "V", "S", "QF", "KTF")


def _sig(fn, const: dict, cache_ty: str, cache_ptrs=("K", "KMIN", "KMAX"), out_i32=False) -> dict:
    """Pointers to the cache (``cache_ptrs``) of ``cache_ty``, fp32 score/table pointers, int32
    index pointers, i64 strides (``s_*``), fp32 ``scale``, i32 sizes."""
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n.startswith("s_"):
            sig[n] = "i64"
        elif n == "scale":
            sig[n] = "fp32"
        elif n == "FAR":
            sig[n] = "*u8"
        elif n in cache_ptrs:
            sig[n] = f"*{cache_ty}"
        elif n in _I32_PTRS or (n == "OUT" and out_i32):
            sig[n] = "*i32"
        elif n in _FP32_PTRS:
            sig[n] = "*fp32"
        else:
            sig[n] = "i32"
    return sig


def aot_specializations():
    """(name, fn, signature, constexprs, num_warps) of every select kernel in its benchmark and odd cases."""
    out = []
    # scores: (head_dim, cache dtype, rope (rotary_dim, interleaved) or None, block_s)
    cases = ((128, torch.bfloat16, None, 64, False), (128, torch.bfloat16, (128, False), 64, False),
             (80, torch.float32, (80, True), 32, False), (96, torch.float16, (48, False), 128, False),
             (128, torch.bfloat16, (128, False), 64, True))
    for D, dt, rope, bs, pmap in cases:
        R, inter = rope if rope else (D, False)
        const = dict(D=D, DP=triton.next_power_of_2(D), R=R, INTERLEAVED=inter, ROPE=rope is not None, MAP=pmap,
                     BLOCK_S=bs)
        ty = TL_DTYPE[dt]
        out.append((f"scores_d{D}_{ty}_rope{int(rope is not None)}" + ("_map" if pmap else ""), _scores_fwd,
                    _sig(_scores_fwd, const, ty), const, 4))
    for fn, blk in ((_vote_stats, 1024), (_vote_sum, 256)):
        const = dict(BLOCK=blk)
        out.append((fn.__name__.lstrip("_"), fn, _sig(fn, const, "fp32"), const, 4))
    for blk, nw in ((1024, 4), (4096, 8)):
        const = dict(BLOCK=blk)
        sig = _sig(_topk_kernel, const, "fp32", cache_ptrs=(), out_i32=True)
        out.append((f"topk_block{blk}", _topk_kernel, sig, const, nw))
    for D, dt in ((128, torch.bfloat16), (80, torch.float32)):
        const = dict(D=D, DP=triton.next_power_of_2(D), BLOCK_P=32)
        ty = TL_DTYPE[dt]
        out.append((f"page_scores_d{D}_{ty}", _page_scores_fwd, _sig(_page_scores_fwd, const, ty), const, 4))
    return out

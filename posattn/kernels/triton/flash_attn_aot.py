"""Ahead-of-time signatures of the flash-attention kernels (tests compile them for sm_90a, sm_80
and sm_89 without a GPU). Strides are i64: the kernels' address arithmetic must hold for any
stride, not only for those the JIT happens to specialise as i32."""
from __future__ import annotations

import torch

from posattn.kernels.triton.flash_attn_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from posattn.kernels.triton.flash_attn_fwd import _attn_fwd_kernel
from posattn.kernels.triton.flash_attn_tiles import _pow2, default_config, tile_meta

TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FP32_PTRS = ("LSE", "DELTA", "COS", "SIN", "KCOS", "KSIN", "FQC", "FQS", "FKC", "FKS")
_I32_PTRS = ("DOC_START", "ROW_START", "Q_OFF", "Q_NFULL", "KV_IDX", "K_OFF", "K_NFULL", "Q_IDX")
_I32_ARGS = ("T", "NUM_ANCHORS", "WINDOW", "QTD", "KTD", "MAP_WIN")
_OTHER_PTRS = {"POSF": "*fp64", "VIS": "*i8"}      # a position map's fp64 positions and visual flags
_FP32_ARGS = ("qk_scale_log2", "sm_scale")


def signature(fn, ty: str, constexprs: dict) -> dict:
    """The signature of one of the kernels: q/k/v-like pointers of type ``ty``, fp32 statistics
    and tables, int32 lists, i32 sizes, fp32 scales, i64 strides (``s_*``)."""
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.startswith("s_"):
            sig[n] = "i64"
        elif n in _I32_ARGS:
            sig[n] = "i32"
        elif n in _FP32_ARGS:
            sig[n] = "fp32"
        elif n in _FP32_PTRS:
            sig[n] = "*fp32"
        elif n in _I32_PTRS:
            sig[n] = "*i32"
        elif n in _OTHER_PTRS:
            sig[n] = _OTHER_PTRS[n]
        else:
            sig[n] = f"*{ty}"
    return sig


def aot_specializations(cases=None):
    """Yield (name, kernel, signature, constexprs, num_warps, num_stages) for ahead-of-time compiles.

    ``cases``: iterable of (head_dim, rotary_dim, interleaved, dtype, causal, window, group[,
    qk_precision[, map code]]) (map code: posattn.position_maps, 0 none); by default the
    benchmark's bf16/128 case with and without rope (and with rope in "bf16x3", and with
    SelfExtend's map), plus odd head dims and fp32.
    """
    if cases is None:
        cases = [(128, 0, False, torch.bfloat16, True, False, 4), (128, 128, False, torch.bfloat16, True, False, 4),
                 (128, 128, False, torch.bfloat16, True, False, 4, "bf16x3"),
                 (128, 128, False, torch.bfloat16, True, False, 4, "bf16", 3),
                 (96, 48, True, torch.float16, False, True, 1), (80, 80, False, torch.float32, True, True, 2),
                 (256, 0, False, torch.bfloat16, True, False, 4), (192, 192, False, torch.bfloat16, True, False, 1)]
    delta_done = set()
    for D, rot, inter, dtype, causal, has_window, group, *extra in cases:
        qkp = extra[0] if extra else "bf16"
        code = extra[1] if len(extra) > 1 else 0
        ty = TL_DTYPE[dtype]
        cfg = default_config(D, dtype, interpret=False, rope=rot > 0)
        meta = tile_meta(D, rot, inter, dtype, qkp, code)
        for kind, fn in (("fwd", _attn_fwd_kernel), ("dq", _attn_bwd_dq_kernel), ("dkdv", _attn_bwd_dkdv_kernel)):
            if kind == "fwd":
                bm, bn, nw, ns = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
            else:
                bm, bn, nw, ns = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"], cfg["bwd_num_warps"], cfg["bwd_num_stages"]
            const = dict(meta, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=has_window)
            name = (f"attn_{kind}_d{D}_r{rot}{'i' if inter else 'h'}_{ty}_{'causal' if causal else 'full'}"
                    f"{'_win' if has_window else ''}_g{group}{'' if qkp == 'bf16' else '_' + qkp}"
                    f"{f'_map{code}' if code else ''}")
            yield name, fn, signature(fn, ty, const), const, nw, ns
        if (D, ty) not in delta_done:  # the backward's rowsum(out * dout), once per head_dim and dtype
            delta_done.add((D, ty))
            const = {"D": D, "BD": _pow2(D), "BLOCK_T": 64}
            yield (f"attn_delta_d{D}_{ty}", _attn_bwd_delta_kernel, signature(_attn_bwd_delta_kernel, ty, const),
                   const, 4, 1)

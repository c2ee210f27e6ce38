"""decode_attention's kernel registrations: one line per backend, plus their supports rules.

Kernel contract (every backend): ``fn(q, k_cache, v_cache, block_table, cache_seqlens,
cu_seqlens_q, tree_mask, causal, window, softmax_scale, num_splits, max_q, config, kv_indices=None)`` ->
(out [T, Hq, D] in q's dtype, lse fp32 [T, Hq]) for the lowered problem described in
posattn/kernels/reference/decode.py; ``window`` <= 0 is none; ``num_splits`` None lets the
backend choose; ``max_q`` is a shape-derived hint of new tokens per request (never a value read
from a tensor).
"""
from __future__ import annotations

import torch

from posattn import dispatch
from posattn.kernels.reference import decode as ref_decode

_NATIVE = ("float16", "bfloat16", "float32")


def _reference_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                  softmax_scale, num_splits, max_q, config, kv_indices=None):
    out, lse = ref_decode.decode_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q,
                                           tree_mask, causal, window, softmax_scale, kv_indices)
    return out.to(q.dtype), lse.to(torch.float32)


def _cpu_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
            softmax_scale, num_splits, max_q, config, kv_indices=None):
    from posattn.kernels import cpu_decode

    return cpu_decode.decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask,
                                     causal, window, softmax_scale, num_splits, max_q, config, kv_indices)


def _triton_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
               softmax_scale, num_splits, max_q, config, kv_indices=None):
    from posattn.kernels.triton import decode as td

    return td.decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal,
                             window, softmax_scale, num_splits, max_q, config, kv_indices)


def _cpu_supports(key):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    if key.dtype not in _NATIVE:
        return False, f"dtype {key.dtype}: the C++ kernel computes in fp32 (float64 runs on the reference)"
    return True, ""


@dispatch.explicit_aware
def _triton_supports(key, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype not in _NATIVE:
        return False, f"dtype {key.dtype} is not compiled for Triton (float16, bfloat16, float32)"
    return True, ""


def _triton_default(key) -> dict:
    from posattn.kernels.triton import decode as td

    return td.default_config(key)


def _triton_space(key) -> list[dict]:
    from posattn.kernels.triton import decode as td

    return td.search_space(key)


dispatch.register("decode_attention", "reference",
                  dtypes=("float32", "float16", "bfloat16", "float64"))(_reference_fn)
def _cpu_default(key) -> dict:
    # num_splits 0: the kernel splits the keys only when there are fewer requests than 2 x threads
    return {"threads": 0, "block_n": 64, "num_splits": 0}


def _cpu_space(key) -> list[dict]:
    return [{"threads": t, "block_n": bn, "num_splits": s} for t in (0, 1) for bn in (32, 64, 128)
            for s in (0, 1, 2, 4)]


dispatch.register("decode_attention", "cpu", supports=_cpu_supports, default_config=_cpu_default,
                  search_space=_cpu_space)(_cpu_fn)
dispatch.register("decode_attention", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=_triton_space)(_triton_fn)

"""decode_attention's kernel registrations: one line per backend, plus their supports rules.

Kernel contract (every backend): ``fn(q, k_cache, v_cache, block_table, cache_seqlens,
cu_seqlens_q, tree_mask, causal, window, softmax_scale, num_splits, max_q, config, kv_indices=None,
rot=None)`` ->
(out [T, Hq, D] in q's dtype, lse fp32 [T, Hq]) for the lowered problem described in
posattn/kernels/reference/decode.py; ``window`` <= 0 is none; ``num_splits`` None lets the
backend choose; ``max_q`` is a shape-derived hint of new tokens per request (never a value read
from a tensor); ``rot`` a posattn/decode/rotary.py DecodeRotary (in-kernel rotation: q is then
``rot.qn``, pre-RoPE keys rotated by its tables, a position map's far pairs) or None.
"""
from __future__ import annotations

import torch

from posattn import _supports as S
from posattn import dispatch
from posattn.kernels.reference import decode as ref_decode


def _reference_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                  softmax_scale, num_splits, max_q, config, kv_indices=None, rot=None):
    out, lse = ref_decode.decode_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q,
                                           tree_mask, causal, window, softmax_scale, kv_indices, rot)
    return out.to(q.dtype), lse.to(torch.float32)


def _cpu_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
            softmax_scale, num_splits, max_q, config, kv_indices=None, rot=None):
    from posattn.kernels import cpu_decode

    return cpu_decode.decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask,
                                     causal, window, softmax_scale, num_splits, max_q, config, kv_indices, rot)


def _triton_fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
               softmax_scale, num_splits, max_q, config, kv_indices=None, rot=None):
    from posattn.kernels.triton import decode as td

    return td.decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal,
                             window, softmax_scale, num_splits, max_q, config, kv_indices, rot)


_cpu_supports = S.cpu(S.NATIVE, "the C++ kernel computes in fp32 (float64 runs on the reference)")
_triton_supports = S.triton(S.NATIVE, "not compiled for Triton (float16, bfloat16, float32)")
_triton_default = S.lazy("posattn.kernels.triton.decode", "default_config")
_triton_space = S.lazy("posattn.kernels.triton.decode", "search_space")


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

"""anchor_attention's kernels: one function per backend and its registry line.

A backend forward is ``fn(q, k, v, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config)``
and its ``fn.backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, lists, spec,
softmax_scale, rope, config)``, where

    lists: BlockLists for (BLOCK_M, BLOCK_N) (forward) or (BWD_BLOCK_M, BWD_BLOCK_N) with the
           transpose (backward); None for a backend with ``uses_lists = False``
    rope:  None or Rope(positions, inv_freq, rotary_dim, interleaved, scaling, table, qk_precision),
           table the call's fp32 [n, 2, rows, T, R/2] cos/sin built once by attention_tables with the
           backend's ``table_backend`` (the values that backend's apply_rope multiplies by),
           qk_precision how rotated 16-bit q/k are multiplied ("bf16", "bf16x3", "fp32")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from posattn import dispatch
from posattn.kernels.reference import attention as ref_attn

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttnKey:
    """What the choice of kernel and launch config depends on."""

    device_type: str
    dtype: str
    head_dim: int
    heads_q: int
    heads_k: int
    rotary_dim: int
    interleaved: bool
    causal: bool
    windowed: bool
    anchors: bool
    tokens_bucket: int
    device_index: int = -1         # q's CUDA device (-1: CPU, or unknown): configs are sized for it
    qk_precision: str = "bf16"     # "bf16" | "bf16x3" | "fp32" (rotated 16-bit q/k products)
    position_map: int = 0          # posattn.position_maps code (0: none): a map doubles the q/k registers


class Rope(NamedTuple):
    positions: torch.Tensor        # [T]
    inv_freq: torch.Tensor         # fp32 [R/2]
    rotary_dim: int
    interleaved: bool
    scaling: float
    table: torch.Tensor | None     # fp32 [n, 2, rows, T, R/2] (posattn.rope.table.attention_tables)
    qk_precision: str = "bf16"
    tables: object = None          # posattn.lowered.RopeTables (the reference rotates from it in fp64)
    position_map: object = None    # posattn.position_maps map or None (table then [3, ...]: near, far q, far k)


def _kernel_rope(rope):
    """(table, rotary_dim, interleaved, qk_precision, map) for the kernels; map is None or
    (position map, positions [T]) and then table is [3, 2, rows, T, R/2] (near, far q, far k)."""
    if rope is None:
        return None
    pm = None if rope.position_map is None else (rope.position_map, rope.positions)
    return (rope.table, rope.rotary_dim, rope.interleaved, rope.qk_precision, pm)


# ---------------------------------------------------------------------------
# triton


def _triton_forward(q, k, v, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config):
    from posattn.kernels.triton import flash_attn as fa

    return fa.attn_forward(q, k, v, lists, spec.num_anchors, spec.causal, spec.window, softmax_scale,
                           _kernel_rope(rope), config)


def _triton_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config):
    from posattn.kernels.triton import flash_attn as fa

    return fa.attn_backward(dout, q, k, v, out, lse, lists, spec.num_anchors, spec.causal, spec.window,
                            softmax_scale, _kernel_rope(rope), config, dlse=dlse)


@dispatch.explicit_aware
def _triton_supports(key: AttnKey, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {key.dtype} is not compiled for Triton (float16, bfloat16, float32)"
    if key.head_dim > MAX_HEAD_DIM:
        return False, f"head_dim {key.head_dim} > {MAX_HEAD_DIM}"
    return True, ""


def smem_per_block(key: AttnKey) -> int | None:
    """Opt-in shared memory per block of the key's CUDA device (q's device, which need not be
    the current one); None off CUDA."""
    if key.device_type != "cuda":
        return None
    index = key.device_index if key.device_index >= 0 else torch.cuda.current_device()
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def _triton_default(key: AttnKey) -> dict:
    from posattn.kernels import triton as tk
    from posattn.kernels.triton import flash_attn as fa

    smem = smem_per_block(key)   # None: sized for an H100
    return fa.default_config(key.head_dim, getattr(torch, key.dtype), interpret=key.device_type == "cpu"
                             and tk.interpreting(), smem_per_block=smem, rope=key.rotary_dim > 0)


_triton_forward.backward = _triton_backward
_triton_forward.table_backend = "triton"
_triton_forward.uses_lists = True


# ---------------------------------------------------------------------------
# cpu (C++)


def _cpu_forward(q, k, v, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config):
    from posattn.kernels import cpu_attention as ca

    return ca.attn_forward(q, k, v, lists, spec.num_anchors, spec.causal, spec.window, softmax_scale,
                           _kernel_rope(rope), config)


def _cpu_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config):
    from posattn.kernels import cpu_attention as ca

    return ca.attn_backward(dout, q, k, v, out, lse, lists, spec.num_anchors, spec.causal, spec.window,
                            softmax_scale, _kernel_rope(rope), config, dlse=dlse)


def _cpu_supports(key: AttnKey):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    if key.dtype not in ("float16", "bfloat16", "float32"):
        return False, f"dtype {key.dtype}: the C++ kernel computes in fp32 (float64 runs on the reference)"
    return True, ""


_cpu_forward.backward = _cpu_backward
_cpu_forward.table_backend = "cpu"
_cpu_forward.uses_lists = True


# ---------------------------------------------------------------------------
# reference (fp64 oracle: rotates in fp64 from the positions, ignores the fp32 table; 16-bit
# rotated q/k are rounded to their dtype with qk_precision "bf16", kept exact otherwise)


def _ref_rope(rope):
    # the full RopeTables stands in for inv_freq (per-head rows, mrope sections, DPE)
    return None if rope is None else (rope.positions, rope.tables, rope.rotary_dim, rope.interleaved, rope.scaling)


def _reference_forward(q, k, v, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope, config):
    out, lse = ref_attn.anchor_attention(q, k, v, cu_seqlens, cu_rows, spec.num_anchors, spec.causal,
                                         spec.window, softmax_scale, _ref_rope(rope),
                                         qk_precision=rope.qk_precision if rope is not None else "bf16",
                                         position_map=rope.position_map if rope is not None else None)
    # outputs take q's strides, as the Triton kernel's and the fake implementation's do
    return torch.empty_like(q).copy_(out), lse.to(torch.float32).contiguous()


def _reference_backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, lists, spec, softmax_scale, rope,
                        config):
    dq, dk, dv = ref_attn.anchor_attention_backward(dout, dlse, q, k, v, cu_seqlens, cu_rows, spec.num_anchors,
                                                    spec.causal, spec.window, softmax_scale, _ref_rope(rope),
                                                    qk_precision=rope.qk_precision if rope is not None else "bf16",
                                                    position_map=rope.position_map if rope is not None else None)
    return torch.empty_like(q).copy_(dq), torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


def _reference_supports(key: AttnKey):
    return True, ""


_reference_forward.backward = _reference_backward
_reference_forward.table_backend = "reference"
_reference_forward.uses_lists = False


dispatch.register("anchor_attention", "reference", supports=_reference_supports,
                  dtypes=("float32", "float16", "bfloat16", "float64"))(_reference_forward)
dispatch.register("anchor_attention", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"BLOCK_M": 32, "BLOCK_N": 64, "threads": 0})(_cpu_forward)
dispatch.register("anchor_attention", "triton", supports=_triton_supports,
                  default_config=_triton_default)(_triton_forward)

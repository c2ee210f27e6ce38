"""posattn.select's kernel registrations: one line per backend, plus their supports rules.

topk kernel contract (every backend): ``fn(scores [R, N] fp32 (fp64: reference only), lengths int32
[R], k, sinks, window, config)`` -> int32 [R, k], see posattn/kernels/reference/select.py.
"""
from __future__ import annotations

from posattn import dispatch


def _topk_reference(scores, lengths, k, sinks, window, config):
    from posattn.kernels.reference import select as ref

    return ref.topk(scores, lengths, k, sinks, window)


def _topk_cpu(scores, lengths, k, sinks, window, config):
    from posattn.kernels import cpu_select

    return cpu_select.topk(scores, lengths, k, sinks, window, config)


def _topk_triton(scores, lengths, k, sinks, window, config):
    from posattn.kernels.triton import select_topk

    return select_topk.topk(scores, lengths, k, sinks, window, config)


def _cpu_supports(key):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    if key.dtype != "float32":
        return False, f"dtype {key.dtype}: the C++ kernel reads fp32 scores (float64 runs on the reference)"
    return True, ""


@dispatch.explicit_aware
def _triton_supports(key, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype != "float32":
        return False, f"dtype {key.dtype}: the Triton kernel reads fp32 scores (float64 runs on the reference)"
    return True, ""


def _triton_default(key) -> dict:
    from posattn.kernels.triton import select_topk

    return select_topk.default_config(key)


def _triton_space(key) -> list[dict]:
    from posattn.kernels.triton import select_topk

    return select_topk.search_space(key)


dispatch.register("topk", "reference", dtypes=("float32", "float64"))(_topk_reference)
dispatch.register("topk", "cpu", supports=_cpu_supports, dtypes=("float32",),
                  default_config=lambda key: {"threads": 0},
                  search_space=lambda key: [{"threads": t} for t in (0, 1)])(_topk_cpu)
dispatch.register("topk", "triton", supports=_triton_supports, dtypes=("float32",), default_config=_triton_default,
                  search_space=_triton_space)(_topk_triton)

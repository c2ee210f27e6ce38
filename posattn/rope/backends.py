"""The kernels that serve ops "rope" and "rope_angles": one registration line per backend
(dispatch picks among them; posattn/kernels/* hold the kernels)."""
from __future__ import annotations

from posattn import dispatch
from posattn.kernels import cpu as cpu_kernels
from posattn.kernels import cuda as cuda_kernels
from posattn.kernels.reference import rope as ref_kernels
from posattn.rope.layout import RopeKey


def _dtype_ok(key: RopeKey, allowed=("float32", "float16", "bfloat16", "float64")):
    return key.dtype in allowed


def _cpu_supports(key: RopeKey):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    return (True, "") if _dtype_ok(key) else (False, f"dtype {key.dtype}")


def _cuda_supports(key: RopeKey):
    if key.device_type != "cuda":
        return False, f"needs CUDA tensors, got {key.device_type}"
    return (True, "") if _dtype_ok(key) else (False, f"dtype {key.dtype}")


@dispatch.explicit_aware
def _triton_supports(key: RopeKey, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    if key.dtype == "float64":
        return False, "float64 is not compiled for Triton"
    return True, ""


def _triton_fn(*args):
    from posattn.kernels.triton import rope as tr

    return tr.rope_forward(*args)


def _triton_angles_fn(*args):
    from posattn.kernels.triton import rope as tr

    return tr.rope_angles_forward(*args)


def _triton_default(key: RopeKey):
    from posattn.kernels.triton import rope as tr

    return tr.default_config(key.head_dim, key.rotary_dim, max(key.heads_q, key.heads_k))


_ALL_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _triton_search_space(key):
    from posattn.kernels.triton import rope as tr

    return tr.rope_search_space(key)


dispatch.register("rope", "reference", dtypes=("float32", "float16", "bfloat16", "float64"))(ref_kernels.rope_forward)
dispatch.register("rope", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cpu_kernels.rope_search_space, prepare=cpu_kernels.rope_prepare)(cpu_kernels.rope_forward)
dispatch.register("rope", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 128},
                  dtypes=("float32", "float16", "bfloat16", "float64"),
                  search_space=cuda_kernels.rope_search_space)(cuda_kernels.rope_forward)
dispatch.register("rope", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=_triton_search_space)(_triton_fn)

dispatch.register("rope_angles", "reference", dtypes=_ALL_DTYPES)(ref_kernels.rope_angles_forward)
dispatch.register("rope_angles", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16}, dtypes=_ALL_DTYPES,
                  search_space=cpu_kernels.rope_search_space,
                  prepare=cpu_kernels.rope_angles_prepare)(cpu_kernels.rope_angles_forward)
dispatch.register("rope_angles", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 128},
                  dtypes=_ALL_DTYPES, search_space=cuda_kernels.rope_search_space)(cuda_kernels.rope_angles_forward)
dispatch.register("rope_angles", "triton", supports=_triton_supports, default_config=_triton_default,
                  search_space=_triton_search_space)(_triton_angles_fn)

"""The NVRTC provider's module object: the same four launch functions, with the same
arguments, as the nvcc-built posattn._cuda (csrc/bind_cuda.cpp), so that callers take
either from posattn.kernels.cuda.module().

Each launch asks posattn._cuda_jit_host (C++, csrc/bind_cuda_jit.cpp) for the problem
struct and the launch decision -- the functions of posattn/cuda_launch_kernels.h that the
nvcc launchers call too -- then launches the NVRTC-compiled instantiation with the CUDA
driver API (CuPy's binding) on the given stream.
"""
from __future__ import annotations

import ctypes

from posattn.kernels import cuda_jit
from posattn.kernels.cuda_jit_catalogue import DTYPES

_WORD = {16: "uint4", 4: "uint32_t", 2: "uint16_t"}


def host():
    import importlib

    return importlib.import_module("posattn._cuda_jit_host")


def rope_kernel_name(dtype: int, launch: dict) -> str:
    vec = launch["vec"] if launch["smem_table"] else 1
    return f"posattn::cuda::rope_kernel_bshd<{DTYPES[dtype]}, {vec}, {'true' if launch['smem_table'] else 'false'}>"


def cos_sin_kernel_name(dtype: int, table_dtype: int, launch: dict) -> str:
    return f"posattn::cuda::rope_cos_sin_kernel<{DTYPES[dtype]}, {DTYPES[table_dtype]}, {launch['vec']}>"


def rope_cache_kernel_name(dtype: int) -> str:
    return f"posattn::cuda::rope_cache_kernel<{DTYPES[dtype]}>"


def kv_compact_kernel_name(launch: dict) -> str:
    return f"posattn::cuda::kv_compact_kernel<{_WORD[launch['vec']]}>"


class JitModule:
    """Stands in for posattn._cuda on one process; modules are loaded per (source, device)."""

    provider = "jit"

    def __init__(self):
        import cupy  # noqa: F401  (fail here, not at the first launch)
        from cupy_backends.cuda.api import driver

        self._driver = driver
        self._funcs: dict = {}
        self._sms: dict = {}

    # -- helpers -----------------------------------------------------------
    def _device(self) -> int:
        import torch

        return torch.cuda.current_device()

    def _sm_count(self, dev: int) -> int:
        if dev not in self._sms:
            import torch

            self._sms[dev] = int(torch.cuda.get_device_properties(dev).multi_processor_count)
        return self._sms[dev]

    def _function(self, source: str, name: str, dev: int):
        key = (source, name, dev)
        f = self._funcs.get(key)
        if f is None:
            mod, lowered = cuda_jit.module(source, dev)
            f = mod.get_function(lowered[name])
            self._funcs[key] = f
        return f

    def _launch(self, source: str, name: str, launch: dict, stream: int, where: str):
        if launch["grid_x"] <= 0 or launch["grid_y"] <= 0:
            return
        dev = self._device()
        f = self._function(source, name, dev)
        d = self._driver
        if launch["smem_attr"]:
            d.funcSetAttribute(f.ptr, d.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(launch["smem"]))
        bufs = [ctypes.create_string_buffer(bytes(a), len(a)) for a in launch["args"]]
        params = (ctypes.c_void_p * len(bufs))(*[ctypes.cast(b, ctypes.c_void_p) for b in bufs])
        try:
            d.launchKernel(f.ptr, int(launch["grid_x"]), int(launch["grid_y"]), 1, int(launch["threads"]), 1, 1,
                           int(launch["smem"]), int(stream), ctypes.addressof(params), 0)
        except Exception as e:
            raise RuntimeError(f"{where} (NVRTC provider) launch failed: {e}") from e

    # -- the four entry points of posattn._cuda ----------------------------
    def rope_forward(self, q, k, dims, pos, freqs, attention_scaling, angles, sign, dtype, threads=128,
                     stream=0):
        if dims[0] * dims[1] > 0x7FFFFFFF:  # as posattn._cuda: one block row per token
            raise ValueError("posattn.kernels.cuda.rope_forward: too many tokens (more than 2^31 - 1)")
        dev = self._device()
        launch = host().rope_launch(q, k, dims, pos, freqs, attention_scaling, angles, sign, dtype, threads,
                                    self._sm_count(dev))
        self._launch("rope_cuda.cu", rope_kernel_name(dtype, launch), launch, stream,
                     "posattn.kernels.cuda.rope_forward")

    def rope_cos_sin_forward(self, q, k, tables, positions, batch, seqlen, head_dim, rotary_dim, interleaved,
                             copy_tail, sign, dtype, table_dtype, threads=256, stream=0):
        if batch * seqlen == 0:
            return
        dev = self._device()
        launch = host().cos_sin_launch(q, k, tables, positions, batch, seqlen, head_dim, rotary_dim, interleaved,
                                       copy_tail, sign, dtype, threads, self._sm_count(dev))
        self._launch("rope_cos_sin.cu", cos_sin_kernel_name(dtype, table_dtype, launch), launch, stream,
                     "posattn.kernels.cuda.rope_cos_sin_forward")

    def rope_cache_forward(self, q, k, dims, pos, freqs, attention_scaling, cache, dtype, threads, stream):
        launch = host().rope_cache_launch(q, k, dims, pos, freqs, attention_scaling, cache, dtype, threads)
        if launch["smem_attr"]:
            raise ValueError("posattn.kernels.cuda.rope_cache_forward: cos/sin table too large")
        self._launch("cache_cuda.cu", rope_cache_kernel_name(dtype), launch, stream,
                     "posattn.kernels.cuda.rope_cache_forward")

    def kv_compact_forward(self, a, threads, stream):
        launch = host().kv_compact_launch(a, threads)
        self._launch("cache_cuda.cu", kv_compact_kernel_name(launch), launch, stream,
                     "posattn.kernels.cuda.kv_compact_forward")

"""The CUDA kernels of csrc/cuda that the JIT provider compiles with NVRTC, by source file.

Each entry names the template instantiations the nvcc launchers of that file can launch
(their switch statements over dtype, table dtype and vector width), as C++ name
expressions; NVRTC instantiates exactly these and reports their mangled names.
"""
from __future__ import annotations

# C++ spellings of the element types (csrc/include/posattn/common.h)
DTYPES = ("float", "posattn::half_t", "posattn::bf16_t", "double")
_SIZE = {"float": 4, "posattn::half_t": 2, "posattn::bf16_t": 2, "double": 8}


def _rope() -> list[str]:
    # rope_cuda.cu launch_typed: VEC in {8, 4, 2, 1} with the shared-memory table, or 1 without
    out = []
    for t in DTYPES:
        for vec, smem in ((8, "true"), (4, "true"), (2, "true"), (1, "true"), (1, "false")):
            out.append(f"posattn::cuda::rope_kernel_bshd<{t}, {vec}, {smem}>")
    return out


def _cos_sin() -> list[str]:
    # rope_cos_sin.cu launch_typed: VEC 8 only for 16-bit, 4 for <= 32-bit, 2 and 1 always
    out = []
    for t in DTYPES:
        vecs = [v for v in (8, 4, 2, 1) if v * _SIZE[t] <= 16]
        for u in DTYPES:
            for vec in vecs:
                out.append(f"posattn::cuda::rope_cos_sin_kernel<{t}, {u}, {vec}>")
    return out


def _cache() -> list[str]:
    return ([f"posattn::cuda::rope_cache_kernel<{t}>" for t in DTYPES]
            + [f"posattn::cuda::kv_compact_kernel<{w}>" for w in ("uint4", "uint32_t", "uint16_t")])


# source file (under csrc/cuda) -> name expressions of its kernels
CATALOGUE: dict[str, tuple[str, ...]] = {
    "rope_cuda.cu": tuple(_rope()),
    "rope_cos_sin.cu": tuple(_cos_sin()),
    "cache_cuda.cu": tuple(_cache()),
}

# the architectures `posattn jit --all` compiles for (real code, no PTX)
ALL_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a")

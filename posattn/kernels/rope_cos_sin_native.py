"""Thin wrappers over posattn._C / posattn._cuda for the cos/sin-table rotary kernel.

Kernel contract (shared by every backend of op "rope_cos_sin"):
    q, qo, k, ko: [B, S, H, D] views, last dim contiguous (k, ko may be None)
    c1, s1, c2, s2: [Bt, N, R/2] table views (Bt in {1, B}); c2 shares c1's strides and
        s2 shares s1's (c2 is c1 / s2 is s1 for half tables)
    pos2: None (row = s, N == S) or [Bp, S] int32/int64 rows into the tables
    sign: +1 forward, -1 for the transposed rotation (with s1/s2 swapped by the caller)
"""
from __future__ import annotations

import torch

from posattn.kernels import cpu, native

_C, _why_c = native.load("_C")
_cuda, _why_cuda = native.load("_cuda")


def _tensor_args(x, out):
    return native.rope_tensor_args(x, out)


def _table_args(c1, s1, c2, s2):
    cb = 0 if c1.shape[0] == 1 else c1.stride(0)
    sb = 0 if s1.shape[0] == 1 else s1.stride(0)
    return [c1.data_ptr(), s1.data_ptr(), c2.data_ptr(), s2.data_ptr(),
            cb, c1.stride(1), c1.stride(2), sb, s1.stride(1), s1.stride(2), c1.shape[1]]


def _pos_args(pos2):
    if pos2 is None:
        return []
    pb, ps = native.pos_strides(pos2)
    return [pos2.data_ptr(), int(pos2.dtype == torch.int64), pb, ps]


def _common(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim, interleaved, sign):
    copy_tail = rotary_dim < q.shape[3] and qo.data_ptr() != q.data_ptr()
    return (_tensor_args(q, qo), _tensor_args(k, ko), _table_args(c1, s1, c2, s2), _pos_args(pos2),
            q.shape[0], q.shape[1], q.shape[3], rotary_dim, bool(interleaved), copy_tail, float(sign),
            native.DTYPE_CODE[q.dtype], native.DTYPE_CODE[c1.dtype])


def cpu_forward(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim: int, interleaved: bool, sign: float,
                config: dict):
    cpu.advise(q, qo)  # fresh large outputs as huge pages (first-touch faults), as the rope kernel
    cpu.advise(k, ko)
    _C.rope_cos_sin_forward(*_common(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim, interleaved, sign),
                            int(config.get("threads", 0)), int(config.get("chunk", 16)))


def cpu_prepare(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim: int, interleaved: bool, sign: float,
                config: dict):
    """cpu_forward prepared for one call signature (the op's plans use it; see
    posattn.dispatch.Kernel.prepare). Returns ``run(q, qo, k, ko, tables, pos2)`` with
    ``tables`` the tuple (c1, s1, c2, s2), for tensors with the shapes, strides, dtypes and
    device of these examples (tables and pos2: the same shapes and dtypes, any strides). Per
    call it reads only pointers, and the tables' and positions' strides when their objects
    change (the plans pass the same tuple and view while they stay valid)."""
    common = _common(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim, interleaved, sign)
    launch = _C.CosSinLaunch(*common, int(config.get("chunk", 16)))
    threads = int(config.get("threads", 0))
    has_k = k is not None and k.shape[2] > 0
    big = cpu.advises(q, qo) or cpu.advises(k, ko)  # sizes are fixed by the signature
    advise = cpu.advise
    last_tab = [None]  # (tables tuple, its args)
    last_pos = [None]  # (pos2, its args)

    def run(q, qo, k, ko, tables, pos2):
        lt = last_tab[0]
        if lt is not None and lt[0] is tables:
            ta = lt[1]
        else:
            ta = _table_args(*tables)
            last_tab[0] = (tables, ta)
        if pos2 is None:
            pa = []
        else:
            lp = last_pos[0]
            if lp is not None and lp[0] is pos2:
                pa = lp[1]
            else:
                pa = _pos_args(pos2)
                last_pos[0] = (pos2, pa)
        if big:
            advise(q, qo)
            advise(k, ko)
        launch(q.data_ptr(), qo.data_ptr(), k.data_ptr() if has_k else 0, ko.data_ptr() if has_k else 0,
               ta, pa, threads)

    return run


def cuda_forward(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    from posattn.kernels import cuda as cuda_kernels  # the serving provider (prebuilt or NVRTC)

    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        cuda_kernels.module().rope_cos_sin_forward(
            *_common(q, qo, k, ko, c1, s1, c2, s2, pos2, rotary_dim, interleaved, sign),
            int(config.get("threads", 0)), stream)


def cuda_built() -> bool:
    """A CUDA provider with the kernel: posattn._cuda built with it, or the NVRTC provider."""
    if _cuda is not None and hasattr(_cuda, "rope_cos_sin_forward"):
        return True
    from posattn.kernels import cuda_jit

    return _cuda is None and cuda_jit.status()[0]


# ---------------------------------------------------------------------------
# autotune search spaces (read by posattn.autotune through the kernel registry)

def cpu_search_space(key) -> list[dict]:
    """Candidate {threads, chunk} for the OpenMP cos/sin kernel (``key``: a CosSinKey).

    The same grid and pruning as the rope kernel's (posattn.kernels.cpu.rope_search_space):
    threads up to the cores this process may use; chunk: tokens handed to a thread at a
    time (dynamic schedule here), never so many that threads stay idle.
    """
    return cpu.rope_search_space(key)


def cuda_search_space(key) -> list[dict]:
    """Candidate block sizes for the CUDA cos/sin kernel (``key``: a CosSinKey)."""
    return [c for c in ({"threads": t} for t in (64, 128, 256, 512, 1024)) if cuda_config_ok(key, c)]


def cuda_config_ok(key, config: dict) -> bool:
    """Prune: a block holds threads // (heads * pairs) tokens (at least one; at most the
    tokens there are and what fits the kernel's 32 KiB of shared table rows, fp32 or fp64);
    a block more than twice as wide as that work only idles threads. (The launcher's plan,
    csrc/include/posattn/cuda_launch.h, also splits heads over blocks for decode sizes.)"""
    t = int(config["threads"])
    half = max(1, int(key.rotary_dim) // 2)
    pairs = max(1, (int(key.heads_q) + int(key.heads_k)) * half)
    acc_bytes = 8 if key.dtype == "float64" else 4
    max_tokens = max(1, 32768 // (4 * half * acc_bytes + 16))  # as cos_sin_launch_plan
    per_block = max(1, min(max_tokens, int(key.tokens_bucket), t // pairs))
    return t % 32 == 0 and t <= 1024 and (t <= 128 or t <= 2 * per_block * pairs)

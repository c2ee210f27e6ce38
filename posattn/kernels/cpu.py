"""Thin wrappers over posattn._C (C++ OpenMP kernels on raw pointers)."""
from __future__ import annotations

import torch

from posattn.kernels import native

_C, _why = native.load("_C")


def status() -> tuple[bool, str]:
    return (_C is not None), _why


def max_threads() -> int:
    return _C.openmp_max_threads() if _C is not None else 0


def rope_forward(q, qo, k, ko, pos2, inv_freq, rotary_dim: int, interleaved: bool, config: dict):
    """q, qo, k, ko: [B, S, H, D] views (last dim contiguous, k/ko may be None);
    pos2: [Bp, S] int32/int64; inv_freq: fp32 [rotary_dim/2]."""
    pb, ps = native.pos_strides(pos2)
    copy_tail = rotary_dim < q.shape[3] and qo.data_ptr() != q.data_ptr()
    _C.rope_forward(
        native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
        q.shape[0], q.shape[1], q.shape[3], pos2.data_ptr(), pos2.dtype == torch.int64, pb, ps,
        inv_freq.data_ptr(), rotary_dim, interleaved, copy_tail, native.DTYPE_CODE[q.dtype],
        int(config.get("threads", 0)), int(config.get("chunk", 16)))


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def rope_search_space(key) -> list[dict]:
    """Candidate {threads, chunk} for the OpenMP rope kernel (``key``: the rope kernel key).

    threads: powers of two up to the cores this process may use, and that
    count itself; chunk: tokens per dynamic-schedule grab.
    """
    n = _cores()
    threads = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t <= n} | {n})
    return [c for c in ({"threads": t, "chunk": ch} for t in threads for ch in (4, 16, 64))
            if rope_config_ok(key, c)]


def rope_config_ok(key, config: dict) -> bool:
    """Prune: no more threads than tokens, and no chunk that leaves threads idle."""
    tokens = max(1, int(getattr(key, "tokens_bucket", 1)))
    t, ch = config["threads"], config["chunk"]
    if t == 1:
        return ch == 16  # one thread: the chunk size changes nothing
    if t > tokens:
        return False
    return ch == 4 or ch * t <= tokens

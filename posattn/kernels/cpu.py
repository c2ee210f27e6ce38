"""Thin wrappers over posattn._C (C++ OpenMP kernels on raw pointers).

Kernel contract shared by every backend (cpu, cuda, triton, reference):

    rope_forward(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config)
        q, qo, k, ko: [B, S, H, D] views, last dim contiguous; q or k may be None
            (or have 0 heads); qo may be q (in place). q receives the DPE query offset.
        pos3: [A, Bp, S] positions (int32/int64/fp32/fp64), Bp in {1, B}, any strides.
        tables: posattn.rope.lowering.RopeTables on the tensors' device.
        sign: +1 rotates by theta, -1 by -theta (the backward).
    rope_angles_forward(q, qo, k, ko, angles, rotary_dim, interleaved, sign, config)
        angles: fp32 [Ba, S, Ha, R/2] view, last dim contiguous; Ba in {1, B};
            head h of a tensor with H heads reads row h // (H // Ha).
"""
from __future__ import annotations

import os

import torch

from posattn.device import cpu_cores
from posattn.kernels import native

_C, _why = native.load("_C")


def status() -> tuple[bool, str]:
    return (_C is not None), _why


def max_threads() -> int:
    return _C.openmp_max_threads() if _C is not None else 0


def _threads(config: dict) -> int:
    # 0 follows torch's intra-op setting, so torch.set_num_threads(n) limits this kernel too
    n = int(config.get("threads", 0))
    return n if n > 0 else torch.get_num_threads()


# Fresh outputs of at least this many bytes are advised as transparent huge pages
# before the kernel first writes them: first-touch page faults (4 KiB each, zeroed
# by the kernel) otherwise cost more than the rotation itself on large tensors.
# POSATTN_CPU_HUGEPAGES=0 turns this off.
HUGEPAGE_MIN_BYTES = 8 << 20
_HUGEPAGES = os.environ.get("POSATTN_CPU_HUGEPAGES", "1") not in ("0", "")


def _advise(x, xo):
    if _HUGEPAGES and xo is not None and x is not None and xo.data_ptr() != x.data_ptr():
        st = xo.untyped_storage()
        if st.nbytes() >= HUGEPAGE_MIN_BYTES:
            _C.advise_hugepages(st.data_ptr(), st.nbytes())


def _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos=(), freqs=(), scaling=1.0, angles=()):
    x, xo = native.pick(q, qo, k, ko)
    if x is None:
        return
    _advise(q, qo)
    _advise(k, ko)
    _C.rope_forward(
        native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
        native.dims_args(x, rotary_dim, interleaved, native.copies_tail(x, xo, rotary_dim)),
        list(pos), list(freqs), float(scaling), list(angles), float(sign), native.DTYPE_CODE[x.dtype],
        _threads(config), int(config.get("chunk", 16)))


def rope_forward(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos=native.pos_args(pos3),
            freqs=native.freq_args(tables), scaling=tables.attention_scaling)


def rope_angles_forward(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float,
                        config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, angles=native.angle_args(angles))


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

def rope_search_space(key) -> list[dict]:
    """Candidate {threads, chunk} for the OpenMP rope kernel (``key``: the rope kernel key).

    threads: powers of two up to the cores this process may use, and that
    count itself; chunk: tokens per statically scheduled block (their cos/sin tables
    are computed once and stay in cache while every head of the block is rotated).
    """
    n = cpu_cores()
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

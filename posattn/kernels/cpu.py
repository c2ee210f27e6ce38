"""Thin wrappers over posattn._C (C++ OpenMP kernels on raw pointers).

Kernel contract shared by every backend (cpu, cuda, triton, reference):

    rope_forward(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config)
        q, qo, k, ko: [B, S, H, D] views, last dim contiguous; q or k may be None
            (or have 0 heads); qo may be q (in place). q receives the DPE query offset.
        pos3: [A, Bp, S] positions (int32/int64/fp32/fp64), Bp in {1, B}, any strides.
        tables: posattn.lowered.RopeTables on the tensors' device.
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


def advise(x, xo):
    """Advise ``xo`` (a kernel's output) as huge pages when it is a fresh buffer of at least
    HUGEPAGE_MIN_BYTES distinct from its input ``x``."""
    if _HUGEPAGES and xo is not None and x is not None and xo.data_ptr() != x.data_ptr():
        st = xo.untyped_storage()
        if st.nbytes() >= HUGEPAGE_MIN_BYTES:
            _C.advise_hugepages(st.data_ptr(), st.nbytes())


def advises(x, xo) -> bool:
    """Whether :func:`advise` can act on outputs of ``xo``'s size (a prepared launcher asks once)."""
    return (_HUGEPAGES and x is not None and xo is not None and x.dim() == 4 and x.shape[2] > 0
            and xo.data_ptr() != x.data_ptr() and xo.numel() * xo.element_size() >= HUGEPAGE_MIN_BYTES)


def _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos=(), freqs=(), scaling=1.0, angles=()):
    x, xo = native.pick(q, qo, k, ko)
    if x is None:
        return
    advise(q, qo)
    advise(k, ko)
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


def rope_prepare(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    """rope_forward prepared for one call signature (the ops' plans use it; see
    posattn.dispatch.Kernel.prepare). Returns ``run(q, qo, k, ko, pos3)``, which launches on
    tensors with the shapes, strides, dtypes and device of these examples (pos3: the same
    shape and dtype, any strides; or a Python float: every token at that one position, as
    rope_shift's scalar delta): only their pointers are read per call. The arguments
    rope_forward rebuilds on every call (strides, dims, frequency tables) are checked once here.
    """
    return _prepare(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos3, native.pos_args,
                    freqs=native.freq_args(tables), scaling=tables.attention_scaling, keep=tables)


def rope_angles_prepare(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float, config: dict):
    """rope_angles_forward prepared for one call signature: ``run(q, qo, k, ko, angles)`` (angles:
    the same shape, any strides), as :func:`rope_prepare`."""
    return _prepare(q, qo, k, ko, rotary_dim, interleaved, sign, config, angles, native.angle_args, angles=True)


def _prepare(q, qo, k, ko, rotary_dim, interleaved, sign, config, src, src_args, freqs=(), scaling=1.0,
             angles=False, keep=None):
    x, xo = native.pick(q, qo, k, ko)
    if x is None:
        return _no_launch
    sa = src_args(src)
    launch = _C.RopeLaunch(native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
                           native.dims_args(x, rotary_dim, interleaved, native.copies_tail(x, xo, rotary_dim)),
                           [] if angles else sa, list(freqs), float(scaling), sa if angles else [],
                           float(sign), native.DTYPE_CODE[x.dtype], int(config.get("chunk", 16)))
    fixed_threads = int(config.get("threads", 0))
    get_threads = torch.get_num_threads
    big = advises(q, qo) or advises(k, ko)  # output sizes are fixed by the signature
    has_q = q is not None and q.shape[2] > 0
    has_k = k is not None and k.shape[2] > 0
    last = [None]  # (src, its args): the plans pass the same view object while it is valid

    def run(q, qo, k, ko, src, _keep=keep):  # _keep: the tables whose memory the launch reads
        if big:
            advise(q, qo)
            advise(k, ko)
        ptrs = (q.data_ptr() if has_q else 0, qo.data_ptr() if has_q else 0,
                k.data_ptr() if has_k else 0, ko.data_ptr() if has_k else 0)
        threads = fixed_threads if fixed_threads > 0 else get_threads()
        ls = last[0]
        if ls is not None and ls[0] is src:
            a = ls[1]
        elif src.__class__ is float:
            launch.run_const(*ptrs, src, threads)
            return
        else:
            a = src_args(src)
            last[0] = (src, a)
        launch(*ptrs, a, threads)

    return run


def _no_launch(*_args):
    return None


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

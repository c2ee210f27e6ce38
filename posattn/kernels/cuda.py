"""Thin wrappers over posattn._cuda (nvcc-built kernels; pointers and stream as integers).

Same contract as posattn.kernels.cpu (see its docstring); launches go on the
current torch stream of the tensors' device.
"""
from __future__ import annotations

import torch

from posattn.kernels import native

_cuda, _why = native.load("_cuda")


def status() -> tuple[bool, str]:
    if _cuda is None:
        return False, _why
    n = _cuda.device_count()
    if n == 0:
        return False, "posattn._cuda is built but no CUDA device is visible"
    if not torch.cuda.is_available():
        return False, "torch cannot see a CUDA device (CPU build of torch?)"
    return True, ""


def built() -> bool:
    return _cuda is not None


def module():
    return _cuda


def _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos=(), freqs=(), scaling=1.0, angles=()):
    x, xo = native.pick(q, qo, k, ko)
    if x is None:
        return
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        _cuda.rope_forward(
            native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
            native.dims_args(x, rotary_dim, interleaved, native.copies_tail(x, xo, rotary_dim)),
            list(pos), list(freqs), float(scaling), list(angles), float(sign),
            native.DTYPE_CODE[x.dtype], int(config.get("threads", 128)), stream)


def rope_forward(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, native.pos_args(pos3),
            native.freq_args(tables), tables.attention_scaling)


def rope_angles_forward(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float,
                        config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, angles=native.angle_args(angles))


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

def rope_search_space(key) -> list[dict]:
    """Candidate block sizes (threads per token block) for the CUDA rope kernel."""
    return [c for c in ({"threads": t} for t in (64, 128, 256, 512, 1024)) if rope_config_ok(key, c)]


def rope_config_ok(key, config: dict) -> bool:
    """Prune: a block much wider than one token's (head, pair) grid only idles threads."""
    t = config["threads"]
    pairs = (int(key.heads_q) + int(key.heads_k)) * max(1, int(key.rotary_dim) // 2)
    return t % 32 == 0 and t <= 1024 and (t <= 128 or t <= 2 * pairs)

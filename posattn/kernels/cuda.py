"""Thin wrappers over posattn._cuda (nvcc-built kernels; pointers and stream as integers)."""
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


def rope_forward(q, qo, k, ko, pos2, inv_freq, rotary_dim: int, interleaved: bool, config: dict):
    """Same contract as posattn.kernels.cpu.rope_forward, on CUDA tensors (current stream)."""
    pb, ps = native.pos_strides(pos2)
    copy_tail = rotary_dim < q.shape[3] and qo.data_ptr() != q.data_ptr()
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        _cuda.rope_forward(
            native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
            q.shape[0], q.shape[1], q.shape[3], pos2.data_ptr(), pos2.dtype == torch.int64, pb,
            ps, inv_freq.data_ptr(), rotary_dim, interleaved, copy_tail,
            native.DTYPE_CODE[q.dtype], int(config.get("threads", 256)), stream)


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

"""posattn.select.topk: choose each row's k highest scores (radix select, not a sort).

The op checks its arguments, flattens ``scores [..., N]`` to rows ``[R, N]`` with one length per
row, and asks dispatch for the kernel (reference / cpu / triton, contract in
posattn/kernels/reference/select.py). Kernels write the chosen indices in ascending index order;
``sorted=True`` reorders the k chosen ones by score here, the same on every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.lowered import token_bucket

MAX_K = 8192
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TopkKey:
    """What the choice of kernel and launch config depends on (shapes only)."""

    device_type: str
    dtype: str
    k_bucket: int
    n_bucket: int
    rows_bucket: int


def _count(x, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo or (hi is not None and x > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}; got {x}")
    return x


def _row_lengths(lengths, scores: torch.Tensor) -> torch.Tensor:
    """int32 [R]: one length per row of scores (a [B] tensor broadcasts over the middle dims)."""
    lead = tuple(scores.shape[:-1])
    N = scores.shape[-1]
    if lengths is None:
        return torch.full((max(1, _numel(lead)),), N, dtype=torch.int32, device=scores.device)[:_numel(lead)]
    V.int_tensor(lengths, "lengths")
    V.same_device(scores, "scores", lengths=lengths)
    shp = tuple(lengths.shape)
    if shp == lead:
        rows = lengths
    elif len(lead) >= 1 and shp == lead[:1]:
        rows = lengths.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)
    else:
        want = f"{list(lead)}" + (f" or {list(lead[:1])}" if len(lead) > 1 else "")
        raise ValueError(f"lengths must be {want} (one length per row, or per leading index); got {list(shp)}")
    return rows.reshape(-1).clamp(0, N).to(torch.int32).contiguous()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _order(scores2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """idx [R, k] (ascending, -1 pads) reordered by score, highest first, ties to the lower index."""
    s = torch.gather(scores2, 1, idx.clamp(min=0).to(torch.int64)).to(torch.float64)
    nan = torch.isnan(s)
    s = torch.where(nan, torch.full_like(s, -float("inf")), s)
    # rank (class, score): numbers, then NaN (below -inf, as in the choice), then the -1 pads
    cls = torch.where(idx < 0, 2, nan.to(torch.int64))
    o1 = torch.sort(s, dim=-1, descending=True, stable=True).indices
    o2 = torch.sort(torch.gather(cls, 1, o1), dim=-1, stable=True).indices
    return torch.gather(idx, 1, torch.gather(o1, 1, o2))


def topk(scores: torch.Tensor, k: int, *, lengths: torch.Tensor | None = None, sinks: int = 0, window: int = 0,
         sorted: bool = False, backend: str | None = None) -> torch.Tensor:  # noqa: A002 (torch's name)
    """The k highest scores of each row, as int32 indices.

    Args:
        scores: float [..., N] (fp32; fp16/bf16 are widened exactly; fp64 runs on the reference).
        k: 1 .. 8192, how many to choose (may exceed N: the rest is -1).
        lengths: int [...] (one per row) or [scores.shape[0]] (one per leading index, e.g. per request
            of [B, H, N] scores), or None for N: only each row's first lengths entries are candidates
            (values are clamped to [0, N]).
        sinks, window: the first ``sinks`` and last ``window`` candidates of each row are always
            chosen (sinks + window <= k).
        sorted: False: chosen indices in ascending index order; True: by score, highest first,
            ties to the lower index. -1 pads at the end either way.
    Returns:
        int32 [..., k]: ``min(k, length)`` chosen indices per row (the highest scores, ties to the
        lower index, NaN below -inf), then -1.
    """
    V.tensor(scores, "scores")
    if scores.dtype not in SCORE_DTYPES:
        raise TypeError(f"scores must be float32, float16, bfloat16 or float64; got {scores.dtype}")
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension ([..., N])")
    _count(k, "k", 1, MAX_K)
    _count(sinks, "sinks", 0)
    _count(window, "window", 0)
    if sinks + window > k:
        raise ValueError(f"sinks + window ({sinks} + {window}) must be at most k ({k}): they are always chosen")
    V.boolean(sorted, "sorted")
    lead, N = tuple(scores.shape[:-1]), scores.shape[-1]
    rows = _row_lengths(lengths, scores)
    s2 = scores.reshape(-1, N) if N else scores.new_zeros(_numel(lead), 0)
    if s2.dtype in (torch.float16, torch.bfloat16):
        s2 = s2.float()                       # exact: the order and the ties are unchanged
    if N and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    key = TopkKey(scores.device.type, str(s2.dtype).removeprefix("torch."), token_bucket(k), token_bucket(N),
                  token_bucket(s2.shape[0]))
    kernel, config = dispatch.select("topk", key, backend=backend, device_index=scores.device.index)
    out = kernel.fn(s2, rows, k, sinks, window, config)
    if sorted and out.numel():
        out = _order(s2, out)
    return out.reshape(lead + (k,))

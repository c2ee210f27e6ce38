"""Drop-in for vLLM's in-place rotary op (``vllm._custom_ops.rotary_embedding``, also SGLang's)::

    # from vllm import _custom_ops as ops; ops.rotary_embedding(...)
    from posattn.compat.vllm import rotary_embedding

query/key [T, H*D], [T, H, D] (or [B, S, H*D] with [B, S] positions) are rotated in place by
rows of ``cos_sin_cache`` [max_position, rotary_dim] (cos then sin); rotary_dim <= head_size,
the rest of each head passes through; key may be None. A position past the cache is a ValueError
on CPU tensors and NaN on a GPU (vLLM's kernel reads outside the cache).
"""
from __future__ import annotations

import torch

from posattn.compat._util import check_on_host
from posattn.rope.cos_sin import apply_rope_cos_sin

__all__ = ["rotary_embedding"]


def _heads_view(x, tokens, head_size, name):
    if x.dim() >= 2 and x.shape[-1] == head_size and x.dim() == 3 and x.shape[0] == tokens:
        return x
    try:
        return x.view(tokens, -1, head_size)
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(x.shape)} must be viewable as [{tokens}, heads, {head_size}] "
                         f"without a copy (it is rotated in place): {e}") from None


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    """Rotate query and key in place; returns None.

    Args:
        positions: [T] (or [B, S]) int32/int64 rows of the cache.
        query: [T, Hq * head_size] or [T, Hq, head_size] (or [B, S, ...]).
        key: the same with Hk heads, or None.
        head_size: D.
        cos_sin_cache: [max_position, rotary_dim], cos then sin, any float dtype.
        is_neox: True for half-split pairs (p, p + rotary_dim/2), False for GPT-J pairs (2p, 2p+1).
    """
    if not isinstance(positions, torch.Tensor) or not isinstance(query, torch.Tensor):
        raise TypeError("positions and query must be torch.Tensors")
    tokens = positions.numel()
    pos = positions.reshape(-1)
    q3 = _heads_view(query, tokens, head_size, "query")
    k3 = _heads_view(key, tokens, head_size, "key") if key is not None else None
    apply_rope_cos_sin(q3, k3, cos_sin_cache=cos_sin_cache, positions=pos, layout="thd",
                       interleaved=not is_neox, inplace=True, check_bounds=check_on_host(pos))

"""Drop-in for FlashInfer's rotary API (``flashinfer.rope``)::

    # import flashinfer; flashinfer.apply_rope_pos_ids(q, k, pos_ids)
    from posattn.compat import flashinfer; flashinfer.apply_rope_pos_ids(q, k, pos_ids)

FlashInfer's argument names and defaults. Frequencies, as FlashInfer documents and computes them:

    freq[p] = rope_theta ** (-2p / rotary_dim)
    apply_rope*:          freq[p] / rope_scale                         (linear position interpolation)
    apply_llama31_rope*:  smooth = clamp((old_context_len * freq / (2 pi) - low_freq_factor)
                                         / (high_freq_factor - low_freq_factor), 0, 1)
                          freq' = (1 - smooth) * freq / rope_scale + smooth * freq

that is ``RopeSpec(scaling=posattn.Linear(rope_scale))`` and ``posattn.Llama3(rope_scale,
low_freq_factor, high_freq_factor, old_context_len)`` (fp32 frequencies, computed as transformers
does), applied by the on-the-fly kernel (``posattn.apply_rope``: angles reduced in fp64, exact far
past 2^24, where FlashInfer's fp32 ``pos * freq`` with ``__sincosf`` is not).
Ragged batches: token t of segment i (``indptr[i] <= t < indptr[i+1]``) sits at
``offsets[i] + t - indptr[i]``. ``apply_rope_with_cos_sin_cache*`` take [nnz, H * head_size] or
[nnz, H, head_size] and any float cache dtype (FlashInfer requires fp32).
"""
from __future__ import annotations

import torch

from posattn.compat._util import check_on_host, segment_positions
from posattn.rope.cos_sin import apply_rope_cos_sin
from posattn.rope.ops import apply_rope
from posattn.rope.scaling import Linear, Llama3
from posattn.rope.spec import RopeSpec

__all__ = [
    "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
    "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
]

_apply_rope_op = apply_rope  # the posattn op; this module's apply_rope is FlashInfer's door


def rope_spec(head_dim: int, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4,
              llama31=None) -> RopeSpec:
    """The posattn RopeSpec FlashInfer's arguments describe: ``rope_scale`` is a linear (position
    interpolation) scaling, the Llama 3.1 arguments are :class:`posattn.Llama3`'s
    (``llama31 = (low_freq_factor, high_freq_factor, old_context_len)``)."""
    if isinstance(rope_scale, bool) or not isinstance(rope_scale, (int, float)) or not rope_scale > 0:
        raise ValueError(f"rope_scale must be a positive number, got {rope_scale!r}")
    if llama31 is not None:
        low, high, old = llama31
        if isinstance(old, float) and old.is_integer():
            old = int(old)
        if isinstance(old, bool) or not isinstance(old, int) or old <= 0:
            raise ValueError(f"old_context_len must be a positive integer, got {old!r}")
        scaling = Llama3(factor=rope_scale, low_freq_factor=low, high_freq_factor=high, original_max_position=old)
    elif rope_scale != 1:
        scaling = Linear(rope_scale)
    else:
        scaling = None
    return RopeSpec(head_dim, rotary_dim=rotary_dim, base=float(rope_theta), interleaved=bool(interleave),
                    scaling=scaling)


def _spec(q, rotary_dim, interleave, rope_scale, rope_theta, llama31=None):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [nnz, num_heads, head_dim] tensor; got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    return rope_spec(q.shape[-1], rotary_dim, interleave, rope_scale, rope_theta, llama31)


def _ragged_positions(q, indptr, offsets):
    if not isinstance(indptr, torch.Tensor) or indptr.dim() != 1:
        raise ValueError("indptr must be a [batch_size + 1] integer tensor")
    if not isinstance(offsets, torch.Tensor) or offsets.shape != (indptr.shape[0] - 1,):
        raise ValueError(f"offsets must be a [batch_size] = [{indptr.shape[0] - 1}] integer tensor")
    return segment_positions(indptr, offsets, q.shape[0], q.device)


def _run(q, k, positions, spec, inplace):
    qo, ko = _apply_rope_op(q, k, positions, spec, layout="thd", inplace=inplace)
    return None if inplace else (qo, ko)


# ---- indptr / offsets --------------------------------------------------------------------------

def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4):
    """q [nnz, Hq, D], k [nnz, Hk, D] ragged by indptr [B+1], offsets [B] -> (q_rope, k_rope)."""
    return _run(q, k, _ragged_positions(q, indptr, offsets), _spec(q, rotary_dim, interleave, rope_scale, rope_theta),
                False)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4):
    """In-place :func:`apply_rope`; returns None."""
    return _run(q, k, _ragged_positions(q, indptr, offsets), _spec(q, rotary_dim, interleave, rope_scale, rope_theta),
                True)


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=5e5,
                       low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
    """Llama 3.1 frequencies, ragged by indptr/offsets -> (q_rope, k_rope)."""
    spec = _spec(q, rotary_dim, interleave, rope_scale, rope_theta, (low_freq_factor, high_freq_factor, old_context_len))
    return _run(q, k, _ragged_positions(q, indptr, offsets), spec, False)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8,
                               rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
    """In-place :func:`apply_llama31_rope`; returns None."""
    spec = _spec(q, rotary_dim, interleave, rope_scale, rope_theta, (low_freq_factor, high_freq_factor, old_context_len))
    return _run(q, k, _ragged_positions(q, indptr, offsets), spec, True)


# ---- pos_ids -----------------------------------------------------------------------------------

def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4):
    """q [nnz, Hq, D], k [nnz, Hk, D], pos_ids [nnz] -> (q_rope, k_rope)."""
    return _run(q, k, pos_ids, _spec(q, rotary_dim, interleave, rope_scale, rope_theta), False)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4):
    """In-place :func:`apply_rope_pos_ids`; returns None."""
    return _run(q, k, pos_ids, _spec(q, rotary_dim, interleave, rope_scale, rope_theta), True)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=5e5,
                               low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
    """Llama 3.1 frequencies at pos_ids [nnz] -> (q_rope, k_rope)."""
    spec = _spec(q, rotary_dim, interleave, rope_scale, rope_theta, (low_freq_factor, high_freq_factor, old_context_len))
    return _run(q, k, pos_ids, spec, False)


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8,
                                       rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
    """In-place :func:`apply_llama31_rope_pos_ids`; returns None."""
    spec = _spec(q, rotary_dim, interleave, rope_scale, rope_theta, (low_freq_factor, high_freq_factor, old_context_len))
    return _run(q, k, pos_ids, spec, True)


# ---- cos_sin_cache (the SGLang / vLLM form) -------------------------------------------------------

def _heads(x, head_size, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        if x.shape[-1] != head_size:
            raise ValueError(f"{name}'s last dim ({x.shape[-1]}) must be head_size ({head_size})")
        return x
    if x.dim() != 2 or x.shape[-1] % head_size:
        raise ValueError(f"{name} must be [nnz, num_heads * head_size] or [nnz, num_heads, head_size] with "
                         f"head_size={head_size}; got shape {tuple(x.shape)}")
    return x.view(x.shape[0], -1, head_size)


def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True):
    """Rows of cos_sin_cache [max_seq_len, rotary_dim] (cos then sin) at positions [nnz];
    returns (query_out, key_out) shaped like query and key."""
    q3, k3 = _heads(query, head_size, "query"), _heads(key, head_size, "key")
    qo, ko = apply_rope_cos_sin(q3, k3, cos_sin_cache=cos_sin_cache, positions=positions, layout="thd",
                                interleaved=not is_neox, check_bounds=check_on_host(positions))
    return qo.view(query.shape), ko.view(key.shape)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True):
    """In-place :func:`apply_rope_with_cos_sin_cache`; returns None."""
    q3, k3 = _heads(query, head_size, "query"), _heads(key, head_size, "key")
    apply_rope_cos_sin(q3, k3, cos_sin_cache=cos_sin_cache, positions=positions, layout="thd",
                       interleaved=not is_neox, inplace=True, check_bounds=check_on_host(positions))

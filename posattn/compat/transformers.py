"""Drop-in for transformers' rotary helpers (``modeling_llama.apply_rotary_pos_emb`` and the
copies every model family carries)::

    # from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from posattn.compat.transformers import apply_rotary_pos_emb

Same contract as transformers' function, autograd included: ``q * cos + rotate_half(q) * sin``
with ``cos``/``sin`` broadcast after ``unsqueeze(unsqueeze_dim)``, computed in fp32 with one
rounding (transformers multiplies in the tensors' dtype, so in bf16/fp16 posattn is the more
exact of the two). A ``cos`` narrower than the head (Phi-3's partial rotary) rotates the leading
``cos.shape[-1]`` dims and passes the rest through, as Phi-3's copy of the function does.
"""
from __future__ import annotations

import torch

from posattn.rope.cos_sin import apply_rope_cos_sin

__all__ = ["apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb_vision"]

_LAYOUT = {1: "bhsd", -3: "bhsd", 2: "bshd", -2: "bshd"}


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Applies Rotary Position Embedding to the query and key tensors.

    Args:
        q: [B, H, S, D] (``unsqueeze_dim=1``) or [B, S, H, D] (``unsqueeze_dim=2``).
        k: the same layout, any number of heads.
        cos, sin: [B or 1, S, R] (R <= D, the duplicated-halves tables a rotary module returns),
            or [S, R] shared by the batch.
        position_ids: deprecated and unused by transformers >= 4.38 when cos is [B, S, R]; when cos
            is a 2-D [max_position, R] cache (transformers <= 4.37), its rows are taken at
            ``position_ids`` as those versions did. An int here (transformers 5's positional
            ``unsqueeze_dim``) is read as unsqueeze_dim.
        unsqueeze_dim: 1 or 2 (or -3 / -2), the dimension cos/sin are unsqueezed along.

    Returns:
        (q_embed, k_embed) in q's dtype.
    """
    if isinstance(position_ids, int) and not isinstance(position_ids, bool):
        unsqueeze_dim, position_ids = position_ids, None
    layout = _LAYOUT.get(unsqueeze_dim)
    if layout is None:
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D] inputs) or 2 ([B, S, H, D]); got {unsqueeze_dim!r}")
    if not isinstance(cos, torch.Tensor):
        raise TypeError(f"cos must be a torch.Tensor, got {type(cos).__name__}")
    positions = None
    if position_ids is not None and cos.dim() == 2:
        positions = position_ids
    return apply_rope_cos_sin(q, k, cos, sin, positions=positions, rotary_dim=cos.shape[-1], layout=layout,
                              check_bounds=positions is not None and positions.device.type == "cpu")


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """Qwen2-VL's multimodal rotary (transformers 4.x): ``cos``/``sin`` are [3, B, S, R], one table
    per position axis (temporal, height, width); ``mrope_section`` [t, h, w] (summing to R/2) says
    which pairs take which axis. The per-token table is assembled (a [B, S, R] gather, small next
    to q and k) and applied by :func:`apply_rotary_pos_emb`."""
    sections = list(mrope_section) * 2
    if cos.dim() != 4 or cos.shape[0] != 3:
        raise ValueError(f"cos must be [3, B, S, R] for the multimodal rotary; got shape {tuple(cos.shape)}")
    if sum(sections) != cos.shape[-1]:
        raise ValueError(f"2 * sum(mrope_section) ({sum(sections)}) must equal cos's last dim ({cos.shape[-1]})")
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """Qwen2-VL's vision-tower rotary: q, k [S, H, D]; cos, sin [S, D]; fp32 math, q's dtype out."""
    return apply_rope_cos_sin(q, k, cos, sin, rotary_dim=cos.shape[-1], layout="thd")

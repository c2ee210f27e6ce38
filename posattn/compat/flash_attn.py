"""Drop-in for flash-attn's rotary::

    # from flash_attn.layers.rotary import apply_rotary_emb
    from posattn.compat.flash_attn import apply_rotary_emb

flash-attn's contract: x [B, S, H, D], or packed [T, H, D] with ``cu_seqlens``; cos/sin
[seqlen_ro, rotary_dim/2] (or [B, seqlen_ro, rotary_dim/2]); token s of sequence b reads row
``s + seqlen_offsets[b]``; dims past rotary_dim pass through; differentiable, in place or not.
``inplace=True`` follows flash-attn, not torch's in-place rules: x is rotated in place even when
it requires grad (a leaf included), the result is a view of x, and the gradient flows to x as
if the rotation had been out of place (backward rotates the gradient by -angle). As in
flash-attn, another op that saved x for its own backward is not told that x changed.
Tables of any float dtype are accepted (flash-attn wants x's dtype). A row past the table is a
ValueError on CPU tensors and NaN on a GPU (flash-attn's kernel silently leaves such tokens
unrotated; its documented contract requires ``seqlen_ro >= seqlen + offset``).
"""
from __future__ import annotations

import torch

from posattn.compat._util import check_on_host, segment_positions
from posattn.rope.cos_sin import apply_rope_cos_sin

__all__ = ["apply_rotary_emb"]


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """
    Args:
        x: [B, S, H, D] if cu_seqlens is None, else [T, H, D].
        cos, sin: [seqlen_ro, rotary_dim / 2] (or [B, seqlen_ro, rotary_dim / 2]).
        interleaved: rotate pairs (2p, 2p+1) (GPT-J) instead of (p, p + rotary_dim/2) (GPT-NeoX).
        inplace: write into x (and return it).
        seqlen_offsets: int, or a [B] int tensor: each sequence is shifted by this many rows
            (decoding with a KV cache).
        cu_seqlens: [B + 1] int32 cumulative sequence lengths of packed x, or None.
        max_seqlen: the longest sequence in packed x (accepted for compatibility; not needed).
    Returns:
        [B, S, H, D] or [T, H, D], x's dtype.
    """
    if not isinstance(cos, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError("x, cos and sin must be torch.Tensors")
    R = 2 * cos.shape[-1]
    check = check_on_host(x, cos)
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, S, H, D] when cu_seqlens is None; got shape {tuple(x.shape)}")
        S = x.shape[1]
        if isinstance(seqlen_offsets, torch.Tensor):
            if seqlen_offsets.dim() != 1 or seqlen_offsets.shape[0] != x.shape[0]:
                raise ValueError(f"seqlen_offsets must be an int or a [B] = [{x.shape[0]}] tensor; "
                                 f"got shape {tuple(seqlen_offsets.shape)}")
            positions = torch.arange(S, device=x.device, dtype=seqlen_offsets.dtype)[None, :] + seqlen_offsets[:, None]
            return _rotate(x, cos, sin, positions, R, "bshd", interleaved, inplace, check)
        off = int(seqlen_offsets)
        rows = cos.shape[-2]
        if off < 0 or off + S > rows:
            raise ValueError(f"seqlen_ro ({rows}) must be >= seqlen ({S}) + seqlen_offsets ({off})")
        # an int offset is a slice of the tables: per-token tables, no positions to build
        c, s = cos[..., off:off + S, :], sin[..., off:off + S, :]
        return _rotate(x, c, s, None, R, "bshd", interleaved, inplace, True)
    if x.dim() != 3:
        raise ValueError(f"x must be [T, H, D] (packed) when cu_seqlens is given; got shape {tuple(x.shape)}")
    if cos.dim() != 2:
        raise ValueError(f"cos/sin must be [seqlen_ro, rotary_dim/2] with cu_seqlens; got shape {tuple(cos.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a [B + 1] integer tensor")
    positions = segment_positions(cu_seqlens, seqlen_offsets, x.shape[0], x.device, "cu_seqlens")
    return _rotate(x, cos, sin, positions, R, "thd", interleaved, inplace, check)


def _rotate(x, cos, sin, positions, R, layout, interleaved, inplace, check):
    """x rotated by the tables (rows ``positions``, or per token when None), in place or not."""
    if inplace and x.requires_grad and torch.is_grad_enabled():
        return _InplaceRotary.apply(x, cos, sin, positions, R, layout, interleaved, check)
    out, _ = apply_rope_cos_sin(x, None, cos, sin, positions=positions, rotary_dim=R, layout=layout,
                                interleaved=interleaved, inplace=inplace, check_bounds=check)
    return out


class _InplaceRotary(torch.autograd.Function):
    """flash-attn's in-place contract under autograd: x is rotated in place, its result is x
    (not marked dirty, so autograd hands out a view of x whose backward is this one, and a
    leaf that requires grad is accepted), and the gradient is that of the out-of-place
    rotation. The forward runs without grad, so apply_rope_cos_sin writes into x directly."""

    @staticmethod
    def forward(ctx, x, cos, sin, positions, R, layout, interleaved, check):
        apply_rope_cos_sin(x, None, cos, sin, positions=positions, rotary_dim=R, layout=layout,
                           interleaved=interleaved, inplace=True, check_bounds=check)
        ctx.save_for_backward(cos, sin, positions)
        ctx.args = (R, layout, interleaved)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        R, layout, interleaved = ctx.args
        # the transpose of a rotation by theta is the rotation by -theta: the same cos, -sin
        # (exact in every float dtype); the rows were bounds-checked in the forward
        dx, _ = apply_rope_cos_sin(grad, None, cos, -sin, positions=positions, rotary_dim=R, layout=layout,
                                   interleaved=interleaved, check_bounds=False)
        return dx, None, None, None, None, None, None, None

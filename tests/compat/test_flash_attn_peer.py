"""flash-attn's own rotary cases, run against the door (posattn.compat.flash_attn).

Written from flash-attn's documented behaviour (flash_attn/layers/rotary.py:
``apply_rotary_emb``) and parametrised like its tests/test_rotary.py
(``test_rotary_emb_func``, ``test_rotary_emb_varlen_func``): seqlen offsets none / an int /
a [B] tensor, rotary fraction 1 and 1/2, interleaved or not, in place or not, fp16 and
bf16, with gradients, and its acceptance rule (rtol 1e-3, atol twice the rounding error of
the output dtype at the reference's magnitude). Shapes are smaller (CPU): 3 sequences of up
to 13 tokens, 3 heads, head_dim 80.

flash-attn's in-place contract, which the door keeps: ``inplace=True`` on a tensor that
requires grad (a leaf included) rotates it in place, returns (a view of) it, and
back-propagates through it as the out-of-place rotation would.
"""
from __future__ import annotations

import math

import pytest
import torch

from posattn.compat import flash_attn

B, S, H, D = 3, 13, 3, 80
DTYPES = [torch.float16, torch.bfloat16]


def _rotate_half(x, interleaved):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _torch_rotary(x, cos, sin, interleaved):
    """flash-attn's documented math: x [B, S, H, D], cos/sin [S, R/2] or [B, S, R/2] rows
    already picked per token; x[..., :R] * cos + rotate_half(x[..., :R]) * sin, the rest kept."""
    R = 2 * cos.shape[-1]
    rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    c, s = rep(cos).unsqueeze(-2), rep(sin).unsqueeze(-2)
    return torch.cat((x[..., :R] * c + _rotate_half(x[..., :R], interleaved) * s, x[..., R:]), -1)


def _cos_sin(rotary_dim, dtype, gen):
    # twice as many rows as tokens, so every offset up to S fits (as the peer's test does)
    angle = torch.rand(2 * S, rotary_dim // 2, generator=gen) * 2 * math.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _offsets(kind, gen):
    if kind == "zero":
        return 0
    if kind == "int":
        return int(torch.randint(0, S + 1, (1,), generator=gen))
    return torch.randint(0, S + 1, (B,), generator=gen, dtype=torch.int32)


def _rows(cos, sin, offsets):
    """The tables' rows each token reads: [S, R/2], or [B, S, R/2] for per-sequence offsets."""
    if isinstance(offsets, torch.Tensor):
        idx = offsets.long()[:, None] + torch.arange(S)[None, :]
        return cos[idx], sin[idx]
    return cos[offsets:offsets + S], sin[offsets:offsets + S]


def _assert_peer_close(got, want):
    """flash-attn's rule: rtol 1e-3, atol twice the rounding error of an arithmetic step."""
    atol = ((want + 0.3 - 0.3) - want).abs().max().item()
    assert torch.allclose(got, want, rtol=1e-3, atol=2 * atol), (got - want).abs().max().item()


CASES = pytest.mark.parametrize("dtype", DTYPES)
OFFSETS = pytest.mark.parametrize("offsets_kind", ["zero", "int", "tensor"])
FRACTION = pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
INTERLEAVED = pytest.mark.parametrize("interleaved", [False, True])
INPLACE = pytest.mark.parametrize("inplace", [False, True])


@CASES
@OFFSETS
@FRACTION
@INTERLEAVED
@INPLACE
def test_rotary_emb_func(inplace, interleaved, rotary_fraction, offsets_kind, dtype):
    gen = torch.Generator().manual_seed(42)
    R = int(rotary_fraction * D)
    x = torch.randn(B, S, H, D, generator=gen).to(dtype).requires_grad_()  # a leaf
    x_pt = x.detach().clone().requires_grad_()
    cos, sin = _cos_sin(R, dtype, gen)
    offsets = _offsets(offsets_kind, gen)
    out = flash_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, interleaved=interleaved,
                                      inplace=inplace)
    cos_pt, sin_pt = _rows(cos, sin, offsets)
    out_pt = _torch_rotary(x_pt.float(), cos_pt.float(), sin_pt.float(), interleaved).to(dtype)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g.clone())
    out_pt.backward(g)
    if inplace:
        assert out.data_ptr() == x.data_ptr()          # the result is x, rotated in place
        assert torch.equal(x.detach(), out.detach())
    else:
        assert torch.equal(x.detach(), x_pt.detach())  # x untouched
    _assert_peer_close(out.detach(), out_pt.detach())
    _assert_peer_close(x.grad, x_pt.grad)


def _unpad(x, mask):
    """flash-attn's unpad_input: the tokens where mask is True, packed, with cu_seqlens."""
    lengths = mask.sum(1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.reshape(-1, *x.shape[2:])[indices], indices, cu, int(lengths.max())


def _pad(x_unpad, indices, batch, seqlen):
    out = x_unpad.new_zeros(batch * seqlen, *x_unpad.shape[1:])
    return out.index_put((indices,), x_unpad).reshape(batch, seqlen, *x_unpad.shape[1:])


@CASES
@OFFSETS
@FRACTION
@INTERLEAVED
@INPLACE
def test_rotary_emb_varlen_func(inplace, interleaved, rotary_fraction, offsets_kind, dtype):
    gen = torch.Generator().manual_seed(42)
    R = int(rotary_fraction * D)
    x = torch.randn(B, S, H, D, generator=gen).to(dtype)
    x_pt = x.detach().clone().requires_grad_()
    lengths = torch.randint(max(1, S - 5), S + 1, (B, 1), generator=gen)
    mask = torch.arange(S)[None, :] < lengths
    x_unpad, indices, cu_seqlens, max_seqlen = _unpad(x, mask)
    x_unpad_clone = x_unpad.clone()
    x_unpad = x_unpad.requires_grad_()  # a leaf
    cos, sin = _cos_sin(R, dtype, gen)
    offsets = _offsets(offsets_kind, gen)
    out_unpad = flash_attn.apply_rotary_emb(x_unpad, cos, sin, seqlen_offsets=offsets, interleaved=interleaved,
                                            inplace=inplace, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    out = _pad(out_unpad, indices, B, S)
    cos_pt, sin_pt = _rows(cos, sin, offsets)
    out_pt = _torch_rotary(x_pt.float(), cos_pt.float(), sin_pt.float(), interleaved).to(dtype)
    out_pt = out_pt.masked_fill(~mask[:, :, None, None], 0.0)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g.clone())
    out_pt.backward(g)
    x_grad = _pad(x_unpad.grad, indices, B, S)
    if inplace:
        assert out_unpad.data_ptr() == x_unpad.data_ptr()
    else:
        assert torch.equal(x_unpad.detach(), x_unpad_clone)
    _assert_peer_close(out.detach(), out_pt.detach())
    _assert_peer_close(x_grad, x_pt.grad)


def test_inplace_on_a_non_leaf_and_a_view():
    """flash-attn callers rotate slices of a fused qkv in place (qkv[:, :, 0]): the slice is a
    non-leaf view; the rotation lands in qkv and the gradient reaches qkv's producer."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(B, S, 3, H, D, generator=gen, requires_grad=True)
    cos, sin = _cos_sin(D // 2, torch.float32, gen)
    qkv = w * 1.0
    q = flash_attn.apply_rotary_emb(qkv[:, :, 0], cos, sin, seqlen_offsets=2, inplace=True)
    assert torch.equal(qkv[:, :, 0].detach(), q.detach())
    w2 = w.detach().clone().requires_grad_()
    q2 = _torch_rotary(w2[:, :, 0], cos[2:2 + S], sin[2:2 + S], False)
    g = torch.randn(q.shape, generator=gen)
    (q * g).sum().backward()
    (q2 * g).sum().backward()
    torch.testing.assert_close(q.detach(), q2.detach(), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(w.grad, w2.grad, atol=2e-6, rtol=2e-6)

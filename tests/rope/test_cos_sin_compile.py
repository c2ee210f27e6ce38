"""apply_rope_cos_sin under torch.compile with inductor (the default backend), fullgraph=True,
compiled before any eager call with these shapes and forms, compared with eager: the
transformers form ([B, S, D] per-token tables), the flash-attn form ([S, R/2]) and a vLLM
cos_sin_cache with positions, with gradients and in place. Small odd shapes (7 tokens,
3 query heads, head_dim 80)."""
from __future__ import annotations

import torch

import posattn

from tests._tol import ELEMENTWISE
from tests.conftest import DEVICE


def _close(a, b):
    atol, rtol = ELEMENTWISE[a.dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _tables(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(rows, width, generator=g, dtype=torch.float64) * 6.3
    return ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def test_forms_forward_and_backward():
    torch._dynamo.reset()
    D, R = 80, 48
    cos_full, sin_full = _tables(7, D, 1)             # transformers: [S, D] -> [1, S, D]
    cos_half, sin_half = _tables(7, R // 2, 2)        # flash-attn: [S, R/2]
    cache = torch.cat(_tables(40, R // 2, 3), -1)     # vLLM: [N, R] (cos then sin)
    pos = torch.tensor([[39, 0, 5, 5, 17, 2, 30], [1, 2, 3, 4, 5, 6, 7]], device=DEVICE)

    def step(q, k):
        a = posattn.apply_rope_cos_sin(q, k, cos_full[None], sin_full[None])
        b = posattn.apply_rope_cos_sin(q, k, cos_half, sin_half, interleaved=True)
        c = posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos)
        outs = [*a, *b, *c]
        loss = sum((o * (i + 1)).square().sum() for i, o in enumerate(outs))
        return loss, [o.detach() for o in outs]

    q0 = torch.randn(2, 7, 3, D, device=DEVICE)
    k0 = torch.randn(2, 7, 1, D, device=DEVICE)
    q1, k1 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss1, outs1 = torch.compile(step, fullgraph=True)(q1, k1)
    loss1.backward()
    q2, k2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss2, outs2 = step(q2, k2)
    loss2.backward()
    for a, b in zip(outs1, outs2):
        _close(a, b)
    torch.testing.assert_close(loss1, loss2, atol=1e-3, rtol=1e-5)  # a sum of 6 * 2*7*4*80 squares
    _close(q1.grad, q2.grad)
    _close(k1.grad, k2.grad)


def test_inplace_without_grad():
    """The mutating custom op (posattn::rope_cos_sin_) under inductor writes into q and k."""
    torch._dynamo.reset()
    cos, sin = _tables(7, 40, 4)

    def f(q, k):
        posattn.apply_rope_cos_sin(q, k, cos, sin, layout="thd", inplace=True)
        return q * 2, k

    q0, k0 = torch.randn(7, 3, 80, device=DEVICE), torch.randn(7, 1, 80, device=DEVICE)
    q1, k1 = q0.clone(), k0.clone()
    got_q, got_k = torch.compile(f, fullgraph=True)(q1, k1)
    want_q, want_k = posattn.apply_rope_cos_sin(q0, k0, cos, sin, layout="thd")
    _close(got_q, want_q * 2)
    _close(got_k, want_k)
    _close(q1, want_q)  # the input itself was rotated
    _close(k1, want_k)

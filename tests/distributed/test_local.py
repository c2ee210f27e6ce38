"""The ring's block products (posattn/distributed/_local.py) without a process group: forward and
backward equal a dense fp64 masked softmax for random masks (rows and tiles with nothing visible
included), and each tile's products cover only the bounding box of its visible entries."""
import pytest
import torch

from posattn.distributed import _local as L
from tests._tol import assert_close


def dense(q, k, v, m, scale, dout, dlse):
    """fp64 masked attention with autograd: out [Tq, Hq, D], lse [Hq, Tq] and the gradients."""
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    out = torch.einsum("hqk,khd->qhd", p, vv)
    live = torch.isfinite(lse)
    torch.autograd.backward([out, lse[live]], [dout.double(), dlse.double()[live]])
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("tile", [3, 1024])
@pytest.mark.parametrize("seed", range(4))
def test_blocks_equal_dense_masked_softmax(tile, seed, monkeypatch):
    monkeypatch.setattr(L, "TILE", tile)
    g = torch.Generator().manual_seed(seed)
    Tq, Tk, HQ, HK, D = 11, 9, 4, 2, 16
    q, dout = torch.randn(Tq, HQ, D, generator=g), torch.randn(Tq, HQ, D, generator=g)
    k, v = torch.randn(Tk, HK, D, generator=g), torch.randn(Tk, HK, D, generator=g)
    dlse = torch.randn(HQ, Tq, generator=g)
    m = torch.rand(Tq, Tk, generator=g) < 0.3
    m[:4] = False                          # a tile (tile 3) and rows with nothing visible
    m[:, 6:] &= seed % 2 == 0              # keys nobody sees
    scale = D ** -0.5
    r_out, r_lse, r_dq, r_dk, r_dv = dense(q, k, v, m, scale, dout, dlse)
    out, lse = L.block_forward(q, k, v, lambda a, b: m[a:b], scale)
    assert_close(out, r_out.detach().float())
    live = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), live)
    assert_close(lse[live], r_lse.detach()[live].float())
    delta = (out * dout).sum(-1).transpose(0, 1) - dlse.masked_fill(~live, 0)
    dq, dk, dv = L.block_backward(dout, q, k, v, lambda a, b: m[a:b], lse, delta, scale)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert_close(got, want.float())


def test_products_cover_only_the_visible_box(monkeypatch):
    """A causal diagonal block of 8 tokens in tiles of 4: the first tile multiplies 4 keys, not 8;
    a tile with nothing visible multiplies nothing."""
    monkeypatch.setattr(L, "TILE", 4)
    seen = []
    real = L._scores
    monkeypatch.setattr(L, "_scores", lambda q, k, m, s: seen.append((q.shape[0], k.shape[0])) or real(q, k, m, s))
    q, k = torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    i = torch.arange(12)
    m = (i[None, :] <= i[:, None]) & (i[:, None] < 8)            # rows 8..11 see nothing
    out, lse = L.block_forward(q, k, k, lambda a, b: m[a:b], 0.25)
    assert seen == [(4, 4), (4, 8)]
    seen.clear()
    L.block_backward(torch.randn(12, 2, 16), q, k, k, lambda a, b: m[a:b], lse, torch.zeros(2, 12), 0.25)
    assert seen == [(4, 4), (4, 8)]

"""The position-map specs: construction checks and each map's pair distances against the
issue's formulas, evaluated pair by pair with Python numbers."""
import math

import pytest
import torch

import posattn
from posattn import position_maps as PM


def _dist(m, pq, pk, vq=None, vk=None):
    a, b = PM.pair_positions(m, pq, pk, vq, vk)
    return a - b


@pytest.mark.parametrize("W", [1, 5, 64])
def test_rerope_distance(W):
    p = torch.arange(0, 300, 7)
    d = _dist(posattn.ReRoPE(W), p, p)
    for i, pi in enumerate(p.tolist()):
        for j, pj in enumerate(p.tolist()):
            dd = pi - pj
            assert d[i, j].item() == (dd if dd < W else W)


def test_leaky_distance_and_float_positions():
    m = posattn.LeakyReRoPE(16, 4.0)
    p = torch.tensor([0, 3, 17, 40, 1000, 2 ** 20], dtype=torch.int64)
    d = _dist(m, p, p)
    for i, pi in enumerate(p.tolist()):
        for j, pj in enumerate(p.tolist()):
            dd = pi - pj
            want = dd if dd < 16 else 16 + (dd - 16) / 4.0
            assert math.isclose(d[i, j].item(), want, rel_tol=0, abs_tol=0.13)   # fp32 far positions
    assert m.far_q(p).dtype == torch.float32 and m.far_k(p).dtype == torch.float32


@pytest.mark.parametrize("G,W", [(1, 8), (3, 8), (4, 7), (8, 512)])
def test_selfextend_distance(G, W):
    p = torch.arange(0, 2000, 13)
    d = _dist(posattn.SelfExtend(G, W), p, p)
    for i, pi in enumerate(p.tolist()):
        for j, pj in enumerate(p.tolist()):
            dd = pi - pj
            want = dd if dd < W else pi // G - pj // G + W - W // G
            assert d[i, j].item() == want
    if G == 1:
        assert torch.equal(d, (p[:, None] - p[None, :]).double())


def test_vista_distance():
    p = torch.arange(10)
    vis = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    m = posattn.VistaRoPE(vis)
    a, b = PM.pair_positions(m, p, p, vis, vis)
    for i in range(10):
        for j in range(10):
            far = (not vis[i]) and bool(vis[j])
            assert (a[i, j].item(), b[i, j].item()) == ((0, 0) if far else (i, j))


def test_tile_kinds():
    m = posattn.ReRoPE(10)
    assert PM.tile_kinds(m, 0, 5, 0, 5) == (True, False)
    assert PM.tile_kinds(m, 100, 110, 0, 5) == (False, True)
    assert PM.tile_kinds(m, 8, 15, 0, 5) == (True, True)


@pytest.mark.parametrize("make,exc,name", [
    (lambda: posattn.ReRoPE(0), ValueError, "window"),
    (lambda: posattn.ReRoPE(2.5), TypeError, "window"),
    (lambda: posattn.LeakyReRoPE(4, 0.0), ValueError, "scale"),
    (lambda: posattn.LeakyReRoPE(-1, 2.0), ValueError, "window"),
    (lambda: posattn.SelfExtend(0, 4), ValueError, "group"),
    (lambda: posattn.SelfExtend(2, 0), ValueError, "window"),
    (lambda: posattn.VistaRoPE(torch.zeros(3)), TypeError, "visual"),
    (lambda: posattn.VistaRoPE([True]), TypeError, "visual"),
])
def test_bad_construction(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_check_position_map():
    spec = posattn.RopeSpec(head_dim=8)
    assert PM.check_position_map(None, None) is None
    with pytest.raises(ValueError, match="rope="):
        PM.check_position_map(posattn.ReRoPE(4), None)
    with pytest.raises(TypeError, match="position_map"):
        PM.check_position_map("rerope", spec)
    with pytest.raises(ValueError, match="mrope_section"):
        PM.check_position_map(posattn.ReRoPE(4), posattn.RopeSpec(head_dim=8, mrope_section=(2, 2)))
    m = posattn.VistaRoPE(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        m.check_visual((5,), torch.device("cpu"), "the packed tokens")


def test_hashable():
    assert hash(posattn.ReRoPE(4)) == hash(posattn.ReRoPE(4))
    assert posattn.SelfExtend(2, 4) == posattn.SelfExtend(2, 4) != posattn.SelfExtend(2, 5)
    v = posattn.VistaRoPE(torch.ones(2, dtype=torch.bool))
    assert {v: 1}[v] == 1

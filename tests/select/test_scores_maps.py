"""posattn.select.scores(position_map=) on every backend: each (query, key) pair rotated near or far
as posattn/position_maps.py defines, against the loop oracle whose per-pair positions come from
position_maps.pair_positions (fp64 angles); the maps' identities; bad input (issue 14)."""
import pytest
import torch

import posattn
from tests.conftest import DEVICE, usable_backends
from tests.select._oracle import scores_oracle
from tests.select.test_scores import _compare, _make

BACKENDS = usable_backends("scores")


def _dev(t):
    return t if t is None or isinstance(t, str) else t.to(DEVICE)


def _visual(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, S, generator=g) < 0.4


def _maps(B, S):
    v = _visual(B, S, 9)
    v[0, 11] = False        # request 0's query (slot 11) is text: its visual keys are unrotated
    return {"rerope": posattn.ReRoPE(5), "leaky": posattn.LeakyReRoPE(4, 3.0), "selfextend": posattn.SelfExtend(4, 6),
            "vista": posattn.VistaRoPE(v)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rerope", "leaky", "selfextend", "vista"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_map_matches_pair_oracle(name, backend, dtype):
    B, HQ, HK, D, ps = 2, 6, 2, 16, 4
    q, kc, cs, bt = _make(B, HQ, HK, D, [11, 17], page_size=ps, dtype=dtype, seed=3)
    S = bt.shape[1] * ps
    m = _maps(B, S)[name]
    rope = posattn.RopeSpec(head_dim=D, base=500.0)
    want, mag = scores_oracle(q, kc, cs, bt, rope=rope, key_positions="slots", position_map=m)
    out = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), block_table=_dev(bt), rope=rope, key_positions="slots",
                                position_map=m if name != "vista" else posattn.VistaRoPE(m.visual.to(DEVICE)),
                                backend=backend)
    _compare(out, want, mag, D, f"{name}/{backend}")
    plain, _ = scores_oracle(q, kc, cs, bt, rope=rope, key_positions="slots")
    assert not torch.allclose(want, plain), "the map changes no pair here: the case tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_up_to_2_pow_20_partial_gptj(backend):
    """Large positions (angles reduced exactly), per-request key positions, SelfExtend, rotary_dim < D."""
    B, HQ, HK, D = 2, 4, 1, 24
    q, kc, cs, bt = _make(B, HQ, HK, D, [9, 14], page_size=5, seed=8)
    S = bt.shape[1] * 5
    g = torch.Generator().manual_seed(4)
    kp = (1 << 20) - 64 + torch.randint(0, 40, (B, S), generator=g)
    pos = torch.tensor([(1 << 20) - 1, (1 << 20) - 3])
    rope = posattn.RopeSpec(head_dim=D, rotary_dim=16, interleaved=True)
    m = posattn.SelfExtend(8, 20)
    want, mag = scores_oracle(q, kc, cs, bt, rope=rope, positions=pos, key_positions=kp, position_map=m)
    out = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), block_table=_dev(bt), rope=rope, positions=_dev(pos),
                                key_positions=_dev(kp), position_map=m, backend=backend)
    _compare(out, want, mag, D, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["kv_group", "soft_vote"])
def test_map_with_reductions(backend, reduce):
    q, kc, cs, bt = _make(2, 6, 2, 16, [13, 7], page_size=4, seed=5)
    rope = posattn.RopeSpec(head_dim=16)
    m = posattn.ReRoPE(4)
    kw = dict(block_table=_dev(bt), rope=rope, key_positions="slots", position_map=m, backend=backend)
    per_head = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), **kw).double().cpu()
    red = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), reduce=reduce, **kw).double().cpu()
    if reduce == "kv_group":
        want = per_head.view(2, 2, 3, -1).sum(2)
    else:
        want = torch.softmax(per_head, -1).nan_to_num(0.0).sum(1, keepdim=True)
        want = torch.where(torch.isinf(per_head[:, :1]), torch.full_like(want, -float("inf")), want)
    torch.testing.assert_close(red, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identities_equal_plain(backend):
    """ReRoPE with window >= the sequence, and SelfExtend with group 1, equal plain pre-RoPE scores
    (exactly: no pair is far / the far positions are the near ones)."""
    q, kc, cs, bt = _make(2, 4, 2, 16, [13, 30], page_size=8, seed=6)
    rope = posattn.RopeSpec(head_dim=16)
    kw = dict(block_table=_dev(bt), rope=rope, key_positions="slots", backend=backend)
    plain = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), **kw)
    for m in (posattn.ReRoPE(31), posattn.ReRoPE(1000), posattn.SelfExtend(1, 3)):
        out = posattn.select.scores(_dev(q), _dev(kc), _dev(cs), position_map=m, **kw)
        assert torch.equal(out, plain), m


def test_bad_input():
    q, kc, cs, bt = _make(2, 4, 2, 16, [3, 5], page_size=4)
    rope = posattn.RopeSpec(head_dim=16)
    with pytest.raises(ValueError, match="position_map needs rope="):
        posattn.select.scores(q, kc, cs, block_table=bt, position_map=posattn.ReRoPE(4))
    with pytest.raises(TypeError, match="position_map must be one of"):
        posattn.select.scores(q, kc, cs, block_table=bt, rope=rope, key_positions="slots", position_map=4)
    with pytest.raises(ValueError, match=r"visual must have shape \(2, 8\)"):
        posattn.select.scores(q, kc, cs, block_table=bt, rope=rope, key_positions="slots",
                              position_map=posattn.VistaRoPE(torch.zeros(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="window must be >= 1"):
        posattn.ReRoPE(0)
    with pytest.raises(ValueError, match="group must be >= 1"):
        posattn.SelfExtend(0, 4)

"""decode_attention with relative-position maps (issue 14): ReRoPE, LeakyReRoPE, SelfExtend and
VistaRoPE over pre-RoPE caches, every backend against the oracle of tests/decode/_oracle_rot.py,
which rotates each (query, key) pair explicitly at posattn.position_maps.pair_positions.
"""
import pytest
import torch

import posattn
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.decode._oracle import Case
from tests.decode.test_decode_attention_prerope import key_positions_for, run_rot

BACKENDS = usable_backends("decode_attention")
ROPE = posattn.RopeSpec(16, rotary_dim=12)
BIG = 2 ** 20 - 200          # key positions up to 2^20


def _visual(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(case.B, case.capacity, generator=g) < 0.4).to(DEVICE)


def _map(name: str, case: Case):
    return {"rerope": lambda: posattn.ReRoPE(5), "leaky": lambda: posattn.LeakyReRoPE(5, 3.0),
            "selfextend": lambda: posattn.SelfExtend(3, 5), "vista": lambda: posattn.VistaRoPE(_visual(case))}[name]()


MAPS = ["rerope", "leaky", "selfextend", "vista"]
SHAPES = {
    # paged, long enough for key tiles wholly near, wholly far and straddling; positions near 2^20
    "paged_big": (dict(q_lens=[2, 1], cached=[37, 20], page_size=8, append=True), "BS", BIG),
    # tree + per-KV-head key lists, contiguous cache, slot positions
    "tree_idx": (dict(q_lens=[5, 3], cached=[21, 9], tree=True, indexed="kv", append=True), "slots", 0),
    # odd sizes: head_dim 80, 3 query heads over 1 KV head... (3 heads), 7 new tokens, float key positions
    "odd_hd80": (dict(q_lens=[7], cached=[19], HQ=3, HK=1, D=80, page_size=5), "S_float", BIG),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", MAPS)
def test_map_matches_oracle(name, shape, backend):
    kw, kind, off = SHAPES[shape]
    D = kw.get("D", 16)
    case = Case(**kw, rope=posattn.RopeSpec(D, rotary_dim=D - 4), device=DEVICE, seed=hash((name, shape)) % 997)
    case.positions = None
    run_rot(case, backend, key_positions_for(case, kind, off), _map(name, case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("qk", ["bf16", "bf16x3"])
def test_map_dtypes(qk, name, dtype, backend):
    case = Case(q_lens=[2, 1], cached=[27, 12], page_size=4, dtype=dtype, append=True, rope=ROPE, device=DEVICE,
                seed=5)
    case.positions = None
    run_rot(case, backend, key_positions_for(case, "BS", BIG), _map(name, case), qk_precision=qk)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_map_num_splits(backend):
    case = Case(q_lens=[1, 2], cached=[30, 11], page_size=4, tree=True, rope=ROPE, device=DEVICE, seed=9)
    case.positions = None
    run_rot(case, backend, "slots", posattn.SelfExtend(2, 4), num_splits=3)


def _pair(case, backend, kp, m, **extra):
    args, kw = case.args()
    a = posattn.decode_attention(*args, **kw, key_positions=kp, position_map=m, return_lse=True, backend=backend,
                                 **extra)
    args, kw = case.args()
    b = posattn.decode_attention(*args, **kw, key_positions=kp, return_lse=True, backend=backend, **extra)
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [posattn.ReRoPE(64), posattn.SelfExtend(1, 3)], ids=["rerope_wide", "selfextend_g1"])
def test_map_reduces_to_plain(m, backend):
    """ReRoPE with window >= the context and SelfExtend with group 1 are plain RoPE."""
    case = Case(q_lens=[3, 1], cached=[40, 7], page_size=8, tree=True, indexed="kv", rope=ROPE, device=DEVICE,
                dtype=torch.bfloat16, seed=2)
    case.positions = None
    (o1, l1), (o2, l2) = _pair(case, backend, "slots", m)
    assert_close(o1, o2, torch.float64, "fp64", msg="out: map vs plain")
    assert_close(l1, l2, torch.float64, "fp64", msg="lse: map vs plain")


def test_map_changes_the_result():
    """The maps are not no-ops: with far pairs a map's result differs from plain RoPE."""
    case = Case(q_lens=[1], cached=[30], page_size=8, rope=ROPE, device=DEVICE, seed=4)
    case.positions = None
    (o1, _), (o2, _) = _pair(case, "reference", "slots", posattn.ReRoPE(4))
    assert (o1 - o2).abs().max() > 1e-3


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("kind, m", [("slots", None), ("BS", posattn.SelfExtend(2, 4)), ("slots", "vista")])
def test_planned_path_reads_no_value_on_the_host(kind, m, backend, monkeypatch):
    """The rotation's lowering (tables, far positions, query positions) is device work only."""
    from posattn.decode import attention as A

    A.clear_plans()
    case = Case(q_lens=[2, 1], cached=[9, 4], page_size=4, tree=True, append=True, rope=ROPE, device=DEVICE,
                dtype=torch.bfloat16)
    case.positions = None
    kp = key_positions_for(case, kind, 1000)
    m = _map("vista", case) if m == "vista" else m
    args, kw = case.args()
    first = posattn.decode_attention(*args, **kw, key_positions=kp, position_map=m, qk_precision="bf16x3",
                                     backend=backend)

    def boom(*a, **k):
        raise AssertionError("host sync on the planned path")

    args, kw = case.args()
    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "cpu"):
            mp.setattr(torch.Tensor, name, boom)
        again = posattn.decode_attention(*args, **kw, key_positions=kp, position_map=m, qk_precision="bf16x3",
                                         backend=backend)
    assert torch.equal(first, again)
    A.clear_plans()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["selfextend", "leaky"])
def test_map_with_explicit_query_positions(name, backend):
    """A tree's queries at cache_seqlens + depth (positions=) while keys sit at their slots."""
    case = Case(q_lens=[5, 3], cached=[22, 9], tree=True, append=True, page_size=4, rope=ROPE, device=DEVICE,
                seed=13)
    depths = [0, 1, 1, 2, 3, 0, 1, 1]
    case.positions = torch.tensor([case.cached[0 if t < 5 else 1] + d for t, d in enumerate(depths)],
                                  dtype=torch.int64).to(DEVICE)
    run_rot(case, backend, "slots", _map(name, case))

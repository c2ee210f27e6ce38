"""posattn.select.scores on every backend against a loop oracle (tests/select/_oracle.py)."""
import random

import pytest
import torch

import posattn
from tests.conftest import DEVICE, usable_backends
from tests.select._oracle import scores_oracle

BACKENDS = usable_backends("scores")


def _make(B, HQ, HK, D, cached, page_size=None, dtype=torch.float32, seed=0, capacity=None):
    g = torch.Generator().manual_seed(seed)
    cap = capacity or max(cached + [1]) + 2
    q = torch.randn(B, HQ, D, generator=g).to(dtype)
    if page_size is None:
        k_cache = torch.randn(B, cap, HK, D, generator=g).to(dtype)
        bt = None
    else:
        mb = -(-cap // page_size)
        nb = B * mb + 3
        k_cache = torch.randn(nb, page_size, HK, D, generator=g).to(dtype)
        bt = torch.randperm(nb, generator=g)[:B * mb].reshape(B, mb).to(torch.int32)
    cs = torch.tensor(cached, dtype=torch.int32)
    return q, k_cache, cs, bt


def _compare(out, want, mag, D, msg=""):
    assert out.dtype == torch.float32
    out = out.double().cpu()
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(out), inf), msg
    assert (out[inf] < 0).all(), msg
    bound = 2 * (D + 8) * 2.0 ** -24 * mag + 1e-30
    err = (out - want).abs().where(~inf, torch.zeros_like(out))
    assert (err <= bound).all(), f"{msg}: max err {float(err.max())} (bound {float(bound[err > bound][0])})"


CASES = {
    "contig_gqa": dict(B=2, HQ=4, HK=2, D=16, cached=[5, 9]),
    "paged_hq3_hd80": dict(B=2, HQ=3, HK=1, D=80, cached=[7, 13], page_size=4),
    "paged_hd96_ps1": dict(B=3, HQ=2, HK=2, D=96, cached=[7, 0, 3], page_size=1),
    "bf16_paged": dict(B=2, HQ=4, HK=1, D=32, cached=[20, 6], page_size=8, dtype=torch.bfloat16),
    "fp16_contig": dict(B=1, HQ=2, HK=1, D=8, cached=[7], dtype=torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle(name, backend):
    q, kc, cs, bt = _make(**CASES[name], seed=len(name))
    want, mag = scores_oracle(q, kc, cs, bt)
    out = posattn.select.scores(q.to(DEVICE), kc.to(DEVICE), cs.to(DEVICE),
                                block_table=None if bt is None else bt.to(DEVICE), backend=backend)
    assert tuple(out.shape) == tuple(want.shape)
    _compare(out, want, mag, q.shape[-1], f"{name}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_pages_shared_pages_any_order(dtype, backend):
    """The CPU scorer walks each request's pages in physical order: many pages per request (tasks
    span several pages), pages shared between logical positions and requests (prefix sharing),
    a request with nothing cached, lengths mid-page; the scores land at the logical slots."""
    B, HQ, HK, D = 3, 4, 2, 16
    q, kc, cs, bt = _make(B, HQ, HK, D, [301, 0, 77], page_size=4, dtype=dtype, seed=7)
    bt[0, 5] = bt[0, 60]
    bt[2, :3] = bt[0, 10:13]
    want, mag = scores_oracle(q, kc, cs, bt)
    dev = (lambda t: t.to(DEVICE))
    out = posattn.select.scores(dev(q), dev(kc), dev(cs), block_table=dev(bt), backend=backend)
    _compare(out, want, mag, D, f"none/{backend}")
    grp = posattn.select.scores(dev(q), dev(kc), dev(cs), block_table=dev(bt), reduce="kv_group", backend=backend)
    wg, mg = want.view(B, HK, HQ // HK, -1).sum(2), mag.view(B, HK, HQ // HK, -1).sum(2)
    _compare(grp, wg, mg * (1 + HQ // HK / (D + 8)), D, f"kv_group/{backend}")


ROPES = {
    "neox_slots": (dict(rotary_dim=None, interleaved=False), "slots", False),
    "gptj_partial_tensor2d": (dict(rotary_dim=8, interleaved=True), "2d", True),
    "neox_partial_tensor1d": (dict(rotary_dim=12, interleaved=False), "1d", False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ROPES))
def test_pre_rope_keys(name, backend):
    """Keys cached before RoPE: the kernel rotates them at key_positions, q at positions."""
    spec_kw, kp_kind, explicit_pos = ROPES[name]
    B, HQ, HK, D = 2, 6, 2, 16
    q, kc, cs, bt = _make(B, HQ, HK, D, [7, 11], page_size=3, seed=5)
    S = bt.shape[1] * 3
    rope = posattn.RopeSpec(head_dim=D, base=500.0, **spec_kw)
    g = torch.Generator().manual_seed(1)
    if kp_kind == "slots":
        kp = "slots"
    elif kp_kind == "1d":
        kp = torch.randint(0, 3000, (S,), generator=g, dtype=torch.int32)
    else:
        kp = torch.randint(0, 3000, (B, S), generator=g, dtype=torch.int64)
    pos = torch.tensor([4000, 17], dtype=torch.int64) if explicit_pos else None
    want, mag = scores_oracle(q, kc, cs, bt, rope=rope, positions=pos, key_positions=kp)
    dev = (lambda t: t if t is None or isinstance(t, str) else t.to(DEVICE))
    out = posattn.select.scores(dev(q), dev(kc), dev(cs), block_table=dev(bt), rope=rope, positions=dev(pos),
                                key_positions=dev(kp), backend=backend)
    _compare(out, want, mag, D, f"{name}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    q, kc, cs, bt = _make(3, 6, 2, 8, [9, 0, 4], page_size=2, seed=2)
    args = (q.to(DEVICE), kc.to(DEVICE), cs.to(DEVICE))
    want, _ = scores_oracle(q, kc, cs, bt)
    kw = dict(block_table=bt.to(DEVICE), backend=backend, softmax_scale=0.7)
    want = want * 0.7 / 8 ** -0.5
    grp = posattn.select.scores(*args, reduce="kv_group", **kw).double().cpu()
    torch.testing.assert_close(grp, want.view(3, 2, 3, -1).sum(2), rtol=1e-5, atol=1e-5)
    vote = posattn.select.scores(*args, reduce="soft_vote", **kw).double().cpu()
    p = torch.softmax(want, dim=-1).nan_to_num(0.0).sum(1, keepdim=True)
    p = torch.where(torch.isinf(want[:, :1]), torch.full_like(p, -float("inf")), p)
    torch.testing.assert_close(vote, p, rtol=1e-5, atol=1e-6)
    assert tuple(vote.shape) == (3, 1, want.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(2))
def test_random(seed, backend):
    rng = random.Random(seed)
    HK = rng.randint(1, 3)
    HQ = HK * rng.randint(1, 3)
    D = rng.choice([8, 24, 80, 96])
    B = rng.randint(1, 3)
    cached = [rng.randint(0, 40) for _ in range(B)]
    ps = rng.choice([None, 1, 5, 16])
    q, kc, cs, bt = _make(B, HQ, HK, D, cached, page_size=ps, seed=seed)
    want, mag = scores_oracle(q, kc, cs, bt)
    out = posattn.select.scores(q.to(DEVICE), kc.to(DEVICE), cs.to(DEVICE),
                                block_table=None if bt is None else bt.to(DEVICE), backend=backend)
    _compare(out, want, mag, D, f"seed {seed}/{backend}")


def test_float64_runs_on_reference():
    q, kc, cs, bt = _make(2, 2, 1, 8, [3, 6], page_size=2, dtype=torch.float64)
    want, _ = scores_oracle(q, kc, cs, bt)
    out = posattn.select.scores(q, kc, cs, block_table=bt)
    torch.testing.assert_close(out.double(), want.float().double(), rtol=1e-6, atol=1e-6)


def _bad(**kw):
    q, kc, cs, bt = _make(2, 4, 2, 16, [3, 5], page_size=4)
    base = dict(q=q, k_cache=kc, cache_seqlens=cs, block_table=bt)
    base.update(kw)
    return posattn.select.scores(base.pop("q"), base.pop("k_cache"), base.pop("cache_seqlens"), **base)


ROPE16 = posattn.RopeSpec(head_dim=16)
BAD = [
    (dict(q=torch.randn(2, 1, 4, 16)), ValueError, r"q must be \[B, Hq, D\]"),
    (dict(q=torch.randn(2, 4, 16, dtype=torch.float16)), TypeError, "k_cache must have q's dtype"),
    (dict(q=torch.randn(2, 3, 16)), ValueError, r"multiple of k_cache's \(2\)"),
    (dict(cache_seqlens=torch.tensor([3, 5])), TypeError, "cache_seqlens must be an int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"cache_seqlens must be \[2\]"),
    (dict(block_table=torch.zeros(2, 3)), TypeError, "block_table must be an int32"),
    (dict(reduce="max"), ValueError, "reduce must be one of"),
    (dict(rope="rope"), TypeError, "rope must be a posattn.RopeSpec"),
    (dict(rope=ROPE16), ValueError, "key_positions is required"),
    (dict(rope=ROPE16, key_positions="pos"), ValueError, 'key_positions must be a tensor or "slots"'),
    (dict(rope=ROPE16, key_positions=torch.zeros(5, dtype=torch.int32)), ValueError, r"key_positions must be \[2, "),
    (dict(rope=ROPE16, key_positions="slots", positions=torch.zeros(3, dtype=torch.int64)), ValueError,
     r"positions must be \[2\]"),
    (dict(rope=posattn.RopeSpec(head_dim=8), key_positions="slots"), ValueError, r"rope.head_dim \(8\)"),
    (dict(key_positions="slots"), ValueError, "only with rope="),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD)
def test_bad_input(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _bad(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_reductions_long_rows_pre_rope(backend, dtype):
    """kv_group (summed queries) and soft_vote (the kernels' own softmax passes) over rows longer
    than one kernel block (Triton's stats loop, the C++ 8-lane exp), pre-RoPE keys, an empty request."""
    B, HQ, HK, D = 3, 8, 2, 16
    q, kc, cs, bt = _make(B, HQ, HK, D, [1100, 0, 37], page_size=16, dtype=dtype, seed=7)
    rope = posattn.RopeSpec(head_dim=D, base=1000.0)
    want, mag = scores_oracle(q, kc, cs, bt, rope=rope, key_positions="slots")
    dev = (lambda t: t.to(DEVICE))
    kw = dict(block_table=dev(bt), rope=rope, key_positions="slots", backend=backend)
    grp = posattn.select.scores(dev(q), dev(kc), dev(cs), reduce="kv_group", **kw).double().cpu()
    inf = torch.isinf(want[:, ::HQ // HK])
    wg = want.view(B, HK, HQ // HK, -1).sum(2)
    bound = 2 * (D + 8 + HQ // HK) * 2.0 ** -24 * mag.view(B, HK, HQ // HK, -1).sum(2) + 1e-30
    assert torch.equal(torch.isinf(grp), inf)
    err = (grp - wg).abs().where(~inf, torch.zeros_like(grp))
    assert (err <= bound).all(), float(err.max())
    vote = posattn.select.scores(dev(q), dev(kc), dev(cs), reduce="soft_vote", **kw).double().cpu()
    p = torch.softmax(want, dim=-1).nan_to_num(0.0).sum(1, keepdim=True)
    p = torch.where(torch.isinf(want[:, :1]), torch.full_like(p, -float("inf")), p)
    assert torch.equal(torch.isinf(vote), torch.isinf(p))
    torch.testing.assert_close(vote, p, rtol=2e-5, atol=1e-7)
    # the votes of a request sum to its number of heads (each head's softmax sums to 1)
    fin = vote.where(torch.isfinite(vote), torch.zeros_like(vote)).sum(-1).squeeze(1)
    torch.testing.assert_close(fin, torch.tensor([HQ, 0, HQ], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_group_scores_once_per_kv_head(backend, monkeypatch):
    """kv_group asks the kernel for Hk query rows (the group's summed queries), not Hq: G times less work."""
    from posattn import dispatch

    kern = dispatch.kernels("scores")[backend]
    seen = []

    def spy(q, *a, **kw):
        seen.append((tuple(q.shape), kw.get("vote", False)))
        return kern.fn(q, *a, **kw)

    monkeypatch.setitem(dispatch._registry["scores"], backend, type(kern)(**{**kern.__dict__, "fn": spy}))
    dispatch.clear_memo()                               # dispatch memoises its choice of kernel
    q, kc, cs, bt = _make(2, 6, 2, 16, [5, 9], page_size=4)
    try:
        for reduce in ("kv_group", "soft_vote"):
            posattn.select.scores(q.to(DEVICE), kc.to(DEVICE), cs.to(DEVICE), block_table=bt.to(DEVICE),
                                  reduce=reduce, backend=backend)
    finally:
        monkeypatch.undo()
        dispatch.clear_memo()
    assert seen == [((2, 2, 16), False), ((2, 6, 16), True)]

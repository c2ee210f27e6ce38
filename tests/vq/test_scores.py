"""posattn.vq.code_scores and vq.scores on every backend against the fp64 oracles (the kernel
contract, and the windowed-rotary definition with each pair's rotation built explicitly), contiguous
and paged caches, GQA, head_dim 80/96, 3 heads, 7 tokens, NeoX/GPT-J/partial rotary; bad input."""
import pytest
import torch

import posattn
from posattn import vq
from posattn.kernels.reference import vq as ref
from tests.conftest import DEVICE
from tests.vq._oracle import windowed_scores

BACKENDS = ["reference", "cpu", "triton"]


def _dev(be):
    return "cpu" if be == "cpu" else DEVICE


def _paged(x, PS, g):
    """[B, S, ...] -> ([NB, PS, ...] shuffled pages, block_table int32 [B, S // PS])."""
    B, S = x.shape[:2]
    per = S // PS
    perm = torch.randperm(B * per, generator=g)
    pages = torch.empty(B * per, PS, *x.shape[2:], dtype=x.dtype)
    pages[perm] = x.reshape(B * per, PS, *x.shape[2:])
    return pages, perm.to(torch.int32).reshape(B, per)


def _case(B, S, HQ, HK, D, C, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, S, HK, D, generator=g).to(dtype)
    cb = vq.fit(keys.reshape(-1, HK, D).float(), torch.randn(32, HQ, D, generator=g), C, iters=2, seed=seed)
    codes = vq.assign(keys.reshape(-1, HK, D), cb, backend="reference").view(B, S, HK)
    q = torch.randn(B, HQ, D, generator=g).to(dtype)
    return g, keys, cb, codes, q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,S,HQ,HK,D,C,PS", [(2, 7, 3, 3, 80, 5, None), (3, 48, 6, 2, 96, 11, 16),
                                              (1, 40, 4, 1, 16, 300, 8), (2, 33, 2, 2, 32, 4, None)])
def test_code_scores_matches_the_contract(backend, B, S, HQ, HK, D, C, PS):
    g, keys, cb, codes, q = _case(B, S, HQ, HK, D, C, seed=S + D)
    far_len = torch.randint(0, S + 3, (B,), generator=g, dtype=torch.int32)
    bt = None
    if PS is not None:
        codes, bt = _paged(codes, PS, g)
    dev = _dev(backend)
    out = vq.code_scores(q.to(dev), cb.to(dev), codes.to(dev), far_len.to(dev),
                         block_table=None if bt is None else bt.to(dev), backend=backend).cpu()
    want = torch.empty(B, HQ, out.shape[2], dtype=torch.float32)
    bt_ref = bt if bt is not None else torch.arange(B, dtype=torch.int32)[:, None]
    ref.code_scores(q.double(), cb.centroids, codes, bt_ref, far_len, D ** -0.5, want)
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    fin = torch.isfinite(want)
    # fp32 table of D-term dots: a few ulps of sum |q||c|
    bound = D * 2.0 ** -23 * (q.abs().max() * cb.centroids.abs().max() * D ** 0.5).item() + 1e-7
    assert (out[fin] - want[fin]).abs().max().item() <= bound if fin.any() else True


SPECS = {
    "neox": lambda D: posattn.RopeSpec(head_dim=D),
    "gptj": lambda D: posattn.RopeSpec(head_dim=D, interleaved=True),
    "partial": lambda D: posattn.RopeSpec(head_dim=D, rotary_dim=D // 2, base=500.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("B,S,HQ,HK,D,C,PS,W", [(2, 7, 3, 3, 80, 5, None, 3), (3, 48, 6, 2, 96, 11, 16, 9),
                                                (2, 40, 4, 2, 16, 40, 8, 50), (2, 32, 2, 1, 32, 6, None, 1)])
def test_scores_matches_windowed_rotary_oracle(backend, spec, B, S, HQ, HK, D, C, PS, W):
    g, keys, cb, codes, q = _case(B, S, HQ, HK, D, C, seed=3 * S + D)
    sp = SPECS[spec](D)
    L = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    L[0] = S                                                    # one request full
    want = windowed_scores(q, keys, codes, cb.centroids, L, W, sp, D ** -0.5)
    kc, cc, bt = keys, codes, None
    if PS is not None:
        perm_g = torch.Generator().manual_seed(7)
        kc, bt = _paged(keys, PS, perm_g)
        cc, bt2 = _paged(codes, PS, torch.Generator().manual_seed(7))
        assert torch.equal(bt, bt2)
    dev = _dev(backend)
    out = vq.scores(q.to(dev), cb.to(dev), cc.to(dev), L.to(dev), k_cache=kc.to(dev), window=W, rope=sp,
                    block_table=None if bt is None else bt.to(dev), backend=backend).cpu()
    assert out.shape == (B, HQ, S) and out.dtype == torch.float32
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    fin = torch.isfinite(want)
    mag = (q.abs().max() * max(keys.abs().max(), cb.centroids.abs().max()) * D).item()
    bound = 8 * 2.0 ** -23 * mag * D ** -0.5 + 1e-6       # fp32 rotation + D-term dot, scaled
    err = (out.double()[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_group_is_the_group_sum(backend):
    B, S, HQ, HK, D = 2, 30, 6, 2, 32
    g, keys, cb, codes, q = _case(B, S, HQ, HK, D, 7, seed=4)
    sp = SPECS["neox"](D)
    L = torch.tensor([30, 12], dtype=torch.int32)
    dev = _dev(backend)
    args = (q.to(dev), cb.to(dev), codes.to(dev), L.to(dev))
    kw = dict(k_cache=keys.to(dev), window=5, rope=sp, backend=backend)
    per_head = vq.scores(*args, **kw).cpu()
    grouped = vq.scores(*args, reduce="kv_group", **kw).cpu()
    assert grouped.shape == (B, HK, S)
    torch.testing.assert_close(grouped, per_head.view(B, HK, HQ // HK, S).sum(2), rtol=1e-5, atol=1e-5)


def test_float64_is_computed_in_float64(monkeypatch):
    """fp64 inputs run on the reference (the far lookup and the window): the oracle to fp64 rounding."""
    B, S, HQ, HK, D, W = 2, 24, 4, 2, 16, 5
    g, keys, cb, codes, q = _case(B, S, HQ, HK, D, 6, seed=9, dtype=torch.float64)
    sp = SPECS["neox"](D)
    L = torch.tensor([24, 10], dtype=torch.int32)
    seen = []
    real = ref.code_scores
    monkeypatch.setattr(ref, "code_scores", lambda qf, *a: seen.append(qf.dtype) or real(qf, *a))
    out = vq.scores(q, cb, codes, L, k_cache=keys, window=W, rope=sp)
    assert seen == [torch.float64]             # the far lookup ran on the reference, in fp64
    want = windowed_scores(q, keys, codes, cb.centroids, L, W, sp, D ** -0.5)
    fin = torch.isfinite(want)
    # fp64 throughout, rounded once to the fp32 output (and fp32 cos/sin tables: 2^-24 relative each)
    err = (out.double()[fin] - want[fin]).abs().max().item()
    assert err <= 4 * 2.0 ** -24 * want[fin].abs().max().item() + 1e-6, err


def test_own_centroid_codes_give_exact_rerope_scores():
    """With one code per key (every key its own centroid), vq.scores is ReRoPE(window) exactly:
    far keys scored with q at `window` and the key unrotated."""
    B, S, H, D, W = 1, 24, 2, 16, 5
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, S, H, D, generator=g)
    cb = vq.fit(keys[0], None, S, iters=0, seed=0)
    codes = vq.assign(keys[0], cb)[None]
    torch.testing.assert_close(cb.centroids[torch.arange(H)[None, :], codes[0].long()], keys[0])
    q = torch.randn(B, H, D, generator=g)
    sp = posattn.RopeSpec(head_dim=D)
    L = torch.tensor([S], dtype=torch.int32)
    out = vq.scores(q, cb, codes, L, k_cache=keys, window=W, rope=sp, backend="cpu")
    from tests.vq._oracle import rotate

    want = torch.empty(H, S, dtype=torch.float64)
    for s in range(S):
        a, b = (S, s) if S - s <= W else (W, 0)
        want[:, s] = (rotate(q[0], torch.tensor(float(a)), sp) * rotate(keys[0, s], torch.tensor(float(b)), sp)).sum(-1)
    torch.testing.assert_close(out[0].double(), want * D ** -0.5, rtol=1e-5, atol=1e-5)


def test_scores_then_topk_and_sparse_decode():
    """The pipeline: vq.scores -> select.topk -> decode_attention(kv_indices=); a budget that covers
    the context attends exactly as dense decode over the same cache."""
    B, S, HQ, HK, D = 2, 40, 4, 2, 32
    g, keys, cb, codes, q = _case(B, S, HQ, HK, D, 8, seed=11)
    sp = posattn.RopeSpec(head_dim=D)
    L = torch.tensor([39, 25], dtype=torch.int32)
    s = vq.scores(q, cb, codes, L, k_cache=keys, window=4, rope=sp)
    idx = posattn.select.topk(s, S, lengths=L)                                   # [B, Hq, S]
    assert set(idx[1, 0][idx[1, 0] >= 0].tolist()) == set(range(25))
    v = torch.randn(B, S, HK, D, generator=g)
    out = posattn.decode_attention(q[:, None], keys, v, L, kv_indices=idx)
    dense = posattn.decode_attention(q[:, None], keys, v, L)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    small = posattn.decode_attention(q[:, None], keys, v, L, kv_indices=posattn.select.topk(s, 4, lengths=L))
    assert not torch.allclose(small, dense, rtol=1e-5, atol=1e-5)


def test_bad_input():
    g, keys, cb, codes, q = _case(2, 16, 4, 2, 16, 4, seed=1)
    sp = posattn.RopeSpec(head_dim=16)
    L = torch.tensor([16, 3], dtype=torch.int32)
    kw = dict(k_cache=keys, window=4, rope=sp)
    with pytest.raises(ValueError, match="window must be >= 1"):
        vq.scores(q, cb, codes, L, k_cache=keys, window=0, rope=sp)
    with pytest.raises(TypeError, match="window must be an int"):
        vq.scores(q, cb, codes, L, k_cache=keys, window=2.0, rope=sp)
    with pytest.raises(TypeError, match="codes must be torch.int16"):
        vq.scores(q, cb, codes.to(torch.int32), L, **kw)
    with pytest.raises(ValueError, match="codes must be \\[B, S_cap, Hk=2\\]"):
        vq.scores(q, cb, codes[..., :1], L, **kw)
    with pytest.raises(ValueError, match="a contiguous codes cache must be \\[B=2"):
        vq.scores(q, cb, codes[:1], L, **kw)
    other = vq.fit(torch.randn(30, 3, 16), None, 4, iters=1)
    with pytest.raises(ValueError, match="not a multiple of the codebook's 3 KV heads"):
        vq.scores(q, other, codes, L, **kw)
    other = vq.fit(torch.randn(30, 2, 32), None, 4, iters=1)
    with pytest.raises(ValueError, match="codebook has head_dim 32 but q have head_dim 16"):
        vq.scores(q, other, codes, L, **kw)
    with pytest.raises(TypeError, match="rope must be a posattn.RopeSpec"):
        vq.scores(q, cb, codes, L, k_cache=keys, window=4, rope=None)
    with pytest.raises(ValueError, match="k_cache must be laid out as codes"):
        vq.scores(q, cb, codes, L, k_cache=keys[:, :8], window=4, rope=sp)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        vq.scores(q, cb, codes, L.long(), **kw)
    with pytest.raises(ValueError, match="reduce"):
        vq.scores(q, cb, codes, L, reduce="soft_vote", **kw)
    with pytest.raises(ValueError, match="far_len must be \\[2\\]"):
        vq.code_scores(q, cb, codes, L[:1])
    with pytest.raises(ValueError, match="softmax_scale must be a positive number"):
        vq.code_scores(q, cb, codes, L, softmax_scale=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_cache(backend):
    dev = _dev(backend)
    cb = vq.fit(torch.randn(20, 2, 16), None, 4, iters=1).to(dev)
    out = vq.scores(torch.randn(2, 4, 16, device=dev), cb, torch.zeros(2, 0, 2, dtype=torch.int16, device=dev),
                    torch.zeros(2, dtype=torch.int32, device=dev), k_cache=torch.zeros(2, 0, 2, 16, device=dev),
                    window=3, rope=posattn.RopeSpec(head_dim=16), backend=backend)
    assert out.shape == (2, 4, 0)

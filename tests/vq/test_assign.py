"""posattn.vq.assign on every backend against the fp64 metric distances (random shapes incl. head_dim
80/96, 3 KV heads, 7 tokens; fp32/fp16/bf16), the fit's properties, and bad input."""
import pytest
import torch

from posattn import vq
from posattn.vq.codebook import metric
from tests.conftest import DEVICE
from tests.vq._oracle import metric_dist

BACKENDS = ["reference", "cpu", "triton"]


def _dev(be):
    return "cpu" if be == "cpu" else DEVICE


def _problem(T, HK, D, C, seed, HQ=None):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(T, HK, D, generator=g)
    HQ = HQ or HK
    basis = torch.randn(HK, 4, D, generator=g)                # queries in a 4-dim subspace per KV head
    q = torch.einsum("thr,hrd->thd", torch.randn(64, HK, 4, generator=g), basis)
    q = q.repeat_interleave(HQ // HK, dim=1) + 0.05 * torch.randn(64, HQ, D, generator=g)
    return keys, q, vq.fit(keys, q, C, iters=3, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,HK,D,C", [(7, 3, 80, 5), (50, 2, 96, 17), (33, 1, 16, 64), (40, 2, 32, 3)])
def test_assign_is_the_nearest_centroid(backend, dtype, T, HK, D, C):
    keys, q, cb = _problem(T, HK, D, C, seed=T + D)
    dev = _dev(backend)
    k = keys.to(dtype)
    codes = vq.assign(k.to(dev), cb.to(dev), backend=backend).cpu()
    assert codes.dtype == torch.int16 and codes.shape == (T, HK)
    M = metric(q, HK, D, "cpu")
    dist = metric_dist(k.to(torch.float64), cb, M)                                  # [T, Hk, C]
    best = dist.min(-1).values
    got = dist.gather(-1, codes.long()[..., None])[..., 0]
    # the chosen centroid is the nearest one up to the fp32 rounding of the distances the kernels
    # compare (norms - 2 k . Mc: about D ulps of the magnitudes summed), so near-ties may differ
    mag = cb.centroid_norms.double().abs()[None] + 2 * torch.einsum(
        "thd,hcd->thc", k.double().abs(), cb.metric_centroids.double().abs())
    bound = 2 * D * 2.0 ** -24 * mag.max(-1).values
    assert ((got - best) <= bound).all(), (got - best - bound).max()
    want = vq.assign(k, cb, backend="reference")
    assert (codes == want).float().mean() >= 0.9


def test_assign_strided_keys_and_int32_codes():
    keys = torch.randn(9, 5, 2, 16).transpose(1, 2)[:, :, 1]                           # strided [9, 2, 16]
    cb = vq.fit(keys, None, 40000, iters=1, seed=0)                                      # C > 32768: int32
    assert cb.code_dtype == torch.int32 and cb.n_codes == 40000
    for be in BACKENDS:
        c = vq.assign(keys.to(_dev(be)), cb.to(_dev(be)), backend=be).cpu()
        assert c.dtype == torch.int32
        # every key is one of the 9 distinct seeds: its own centroid, distance 0
        assert torch.equal(cb.centroids[torch.arange(2)[None, :], c.long()], keys)


def test_fit_is_deterministic_and_means():
    keys, q, cb = _problem(300, 2, 32, 8, seed=3)
    cb2 = vq.fit(keys, q, 8, iters=3, seed=3)
    assert torch.equal(cb.centroids, cb2.centroids)
    cb4 = vq.fit(keys, q, 8, iters=4, seed=3)
    codes = vq.assign(keys, cb4, backend="reference")
    # after a Lloyd step each centroid is the mean of its cluster's keys (in the key space)
    cb5 = vq.fit(keys, q, 8, iters=5, seed=3)
    for h in range(2):
        for c in range(8):
            sel = codes[:, h] == c
            if sel.any():
                torch.testing.assert_close(cb5.centroids[h, c], keys[sel, h].mean(0), rtol=1e-4, atol=1e-5)


def test_query_aware_beats_plain_kmeans_on_the_score_error():
    """The objective: sum (q . (k - c))^2 over held-out queries is lower with the query metric."""
    keys, q, cb = _problem(2000, 1, 32, 16, seed=5)
    plain = vq.fit(keys, None, 16, iters=10, seed=5)
    aware = vq.fit(keys, q, 16, iters=10, seed=5)
    _, q2, _ = _problem(2000, 1, 32, 2, seed=5)                     # the same subspace, fresh queries

    def err(c):
        k_hat = c.centroids[0][vq.assign(keys, c, backend="reference")[:, 0].long()]
        return ((q2[:, 0] @ (keys[:, 0] - k_hat).T) ** 2).mean()

    assert err(aware) < 0.5 * err(plain)
    assert aware.query_aware and not plain.query_aware


def test_rank_deficient_metric_is_regularised():
    keys = torch.randn(100, 1, 16)
    q = torch.zeros(10, 1, 16)
    q[:, 0, 0] = torch.randn(10)                                    # rank 1
    cb = vq.fit(keys, q, 4, iters=2, seed=0)
    assert torch.isfinite(cb.centroids).all() and torch.isfinite(cb.metric_centroids).all()
    cb0 = vq.fit(keys, torch.zeros(3, 1, 16), 4, iters=2, seed=0)   # all-zero queries: M = I
    assert torch.isfinite(cb0.centroids).all()


def test_bad_input():
    keys = torch.randn(20, 2, 16)
    with pytest.raises(ValueError, match="n_codes must be >= 1"):
        vq.fit(keys, None, 0)
    with pytest.raises(TypeError, match="n_codes must be an int"):
        vq.fit(keys, None, 2.0)
    with pytest.raises(ValueError, match="keys must be \\[T, Hk, D\\]"):
        vq.fit(keys[0], None, 2)
    with pytest.raises(ValueError, match="queries must be \\[Tq, Hq, D=16\\]"):
        vq.fit(keys, torch.randn(4, 2, 8), 2)
    with pytest.raises(ValueError, match="Hq a multiple of the keys' Hk=2"):
        vq.fit(keys, torch.randn(4, 3, 16), 2)
    with pytest.raises(ValueError, match="iters must be a non-negative int"):
        vq.fit(keys, None, 2, iters=-1)
    cb = vq.fit(keys, None, 4, iters=1)
    with pytest.raises(ValueError, match="codebook has head_dim 16 but keys have head_dim 32"):
        vq.assign(torch.randn(5, 2, 32), cb)
    with pytest.raises(ValueError, match="codebook has 2 KV heads but keys have 3"):
        vq.assign(torch.randn(5, 3, 16), cb)
    with pytest.raises(TypeError, match="codebook must be a posattn.vq.Codebook"):
        vq.assign(keys, "cb")
    with pytest.raises(TypeError, match="keys"):
        vq.assign(keys.to(torch.int32), cb)


def test_fit_with_a_large_common_offset():
    """Keys far from the origin (a shared offset 1000x their spread) still get distinct centroids."""
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(8, 1, 16, generator=g)                                  # 8 well separated clusters
    keys = (pts.repeat(50, 1, 1) + 0.01 * torch.randn(400, 1, 16, generator=g)) * 0.1 + 100.0
    cb = vq.fit(keys, None, 8, iters=5, seed=0)
    codes = vq.assign(keys, cb, backend="reference")[:, 0]
    assert codes.unique().numel() == 8
    # each cluster maps to one code
    assert all(codes[i::8].unique().numel() == 1 for i in range(8))

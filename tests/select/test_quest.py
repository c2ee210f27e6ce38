"""Quest: page_summary, update_page_summary, page_scores (every backend), expand_pages, vs loop oracles."""
import pytest
import torch

import posattn
from posattn.select import PageSummary, expand_pages, page_scores, page_summary, update_page_summary
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("page_scores")


def _paged(B, HK, D, cached, ps, extra=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mb = -(-(max(cached) + 12) // ps)
    nb = B * mb + extra
    kc = torch.randn(nb, ps, HK, D, generator=g).to(dtype)
    bt = torch.randperm(nb, generator=g)[:B * mb].reshape(B, mb).to(torch.int32)
    return kc, bt, torch.tensor(cached, dtype=torch.int32)


def _oracle_summary(kc, bt, cs, ps):
    """{physical page: (min, max) [Hk, D]} over each request's valid rows, by loops."""
    out = {}
    for b in range(cs.shape[0]):
        L = int(cs[b])
        for p in range(-(-L // ps)):
            page = int(bt[b, p]) if bt is not None else None
            rows = [kc[page, r] if bt is not None else kc[b, p * ps + r] for r in range(min(ps, L - p * ps))]
            st = torch.stack(rows)
            out[(b, p)] = (page, st.amin(0), st.amax(0))
    return out


@pytest.mark.parametrize("ps,cached", [(4, [7, 16, 1]), (1, [3, 0, 5]), (16, [40, 9, 16])])
def test_page_summary_paged(ps, cached):
    kc, bt, cs = _paged(3, 2, 12, cached, ps, seed=ps)
    s = page_summary(kc.to(DEVICE), cs.to(DEVICE), block_table=bt.to(DEVICE))
    assert isinstance(s, PageSummary) and s.page_size == ps and tuple(s.kmin.shape) == (kc.shape[0], 2, 12)
    for (b, p), (page, mn, mx) in _oracle_summary(kc, bt, cs, ps).items():
        assert torch.equal(s.kmin[page].cpu(), mn), (b, p)
        assert torch.equal(s.kmax[page].cpu(), mx), (b, p)


def test_page_summary_contiguous_bf16():
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(2, 12, 3, 8, generator=g).to(torch.bfloat16)
    cs = torch.tensor([7, 12], dtype=torch.int32)
    s = page_summary(kc, cs, page_size=4)
    assert s.kmin.dtype == torch.bfloat16 and tuple(s.kmin.shape) == (6, 3, 8)
    for b in range(2):
        L = int(cs[b])
        for p in range(-(-L // 4)):
            rows = kc[b, p * 4:min(L, p * 4 + 4)]
            assert torch.equal(s.kmin[b * 3 + p], rows.amin(0)) and torch.equal(s.kmax[b * 3 + p], rows.amax(0))


@pytest.mark.parametrize("num_new", [1, 3, 9])
def test_update_after_append(num_new):
    """After keys are appended at cache_seqlens + i, the touched pages (a freshly used page with stale
    contents included) equal a summary built from scratch."""
    ps = 4
    kc, bt, cs = _paged(3, 2, 8, [7, 8, 0], ps, seed=num_new)
    s = page_summary(kc, cs, block_table=bt)
    g = torch.Generator().manual_seed(7)
    for b in range(3):
        for i in range(num_new):
            slot = int(cs[b]) + i
            kc[int(bt[b, slot // ps]), slot % ps] = torch.randn(2, 8, generator=g) * 3
    update_page_summary(s, kc, cs, num_new, block_table=bt)
    fresh = page_summary(kc, cs + num_new, block_table=bt)
    for (b, p), (page, mn, mx) in _oracle_summary(kc, bt, cs + num_new, ps).items():
        assert torch.equal(s.kmin[page], mn) and torch.equal(s.kmax[page], mx), (b, p)
        assert torch.equal(fresh.kmin[page], mn)


def _oracle_page_scores(q, s, cs, ps, bt):
    B, HQ, D = q.shape
    HK = s.kmin.shape[1]
    MP = bt.shape[1] if bt is not None else s.kmin.shape[0] // B
    want = torch.full((B, HQ, MP), -float("inf"), dtype=torch.float64)
    for b in range(B):
        for p in range(MP):
            if p * ps >= int(cs[b]):
                continue
            page = int(bt[b, p]) if bt is not None else b * MP + p
            for h in range(HQ):
                qd = q[b, h].double()
                mn, mx = s.kmin[page, h // (HQ // HK)].double(), s.kmax[page, h // (HQ // HK)].double()
                want[b, h, p] = float(torch.maximum(qd * mn, qd * mx).sum())
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("D,HQ,HK", [(16, 4, 2), (80, 3, 1), (96, 2, 2)])
def test_page_scores(D, HQ, HK, paged, backend):
    ps = 4
    g = torch.Generator().manual_seed(D)
    cs = torch.tensor([7, 13], dtype=torch.int32)
    if paged:
        kc, bt, _ = _paged(2, HK, D, [7, 13], ps, seed=D)
        s = page_summary(kc, cs, block_table=bt)
    else:
        kc, bt = torch.randn(2, 16, HK, D, generator=g), None
        s = page_summary(kc, cs, page_size=ps)
    q = torch.randn(2, HQ, D, generator=g)
    want = _oracle_page_scores(q, s, cs, ps, bt)
    out = page_scores(q.to(DEVICE), s.kmin.to(DEVICE), s.kmax.to(DEVICE), cs.to(DEVICE), page_size=ps,
                      block_table=None if bt is None else bt.to(DEVICE), backend=backend).double().cpu()
    assert out.shape == want.shape
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(out), inf)
    mag = _oracle_page_scores(q.abs(), PageSummary(s.kmin.abs(), s.kmax.abs(), ps), cs, ps, bt)
    bound = 2 * (D + 2) * 2.0 ** -24 * mag
    assert ((out - want).abs()[~inf] <= bound[~inf]).all()


def test_page_bound_holds_for_every_key():
    """The point of Quest: a page's score bounds q . k of every valid key in it."""
    ps = 8
    kc, bt, cs = _paged(2, 1, 16, [30, 11], ps, seed=3)
    q = torch.randn(2, 2, 16)
    s = page_summary(kc, cs, block_table=bt)
    ub = page_scores(q, s.kmin, s.kmax, cs, page_size=ps, block_table=bt)
    for b in range(2):
        for t in range(int(cs[b])):
            k = kc[int(bt[b, t // ps]), t % ps, 0]
            for h in range(2):
                assert float(q[b, h] @ k) <= float(ub[b, h, t // ps]) + 1e-5


def test_expand_pages():
    pages = torch.tensor([[[2, -1, 0]], [[1, 3, -1]]], dtype=torch.int32)
    cs = torch.tensor([9, 13], dtype=torch.int32)
    tok = expand_pages(pages, 4, cs)
    assert tok.tolist() == [[[8, -1, -1, -1, -1, -1, -1, -1, 0, 1, 2, 3]],
                            [[4, 5, 6, 7, 12, -1, -1, -1, -1, -1, -1, -1]]]


def test_bad_input():
    kc, bt, cs = _paged(2, 2, 8, [5, 6], 4)
    s = page_summary(kc, cs, block_table=bt)
    other = page_summary(kc.reshape(-1, 2, 2, 8), cs, block_table=torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="summary was built for page_size 2, but the cache's pages hold 4"):
        update_page_summary(other, kc, cs, 1, block_table=bt)
    with pytest.raises(TypeError, match="summary must be a posattn.select.PageSummary"):
        update_page_summary((s.kmin, s.kmax), kc, cs, 1, block_table=bt)
    with pytest.raises(ValueError, match="num_new must be a positive int"):
        update_page_summary(s, kc, cs, 0, block_table=bt)
    with pytest.raises(ValueError, match="page_size must be a positive int for a contiguous cache"):
        page_summary(torch.randn(2, 8, 1, 4), cs)
    with pytest.raises(ValueError, match=r"must be a multiple of page_size \(3\)"):
        page_summary(torch.randn(2, 8, 1, 4), cs, page_size=3)
    with pytest.raises(ValueError, match=r"page_size \(8\) must be the paged cache's page size \(4\)"):
        page_summary(kc, cs, block_table=bt, page_size=8)
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="kmin and kmax must be"):
        page_scores(q, s.kmin, s.kmax[:-1], cs, page_size=4, block_table=bt)
    with pytest.raises(ValueError, match=r"multiple of kmin's \(2\)"):
        page_scores(torch.randn(2, 3, 8), s.kmin, s.kmax, cs, page_size=4, block_table=bt)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        page_scores(q, s.kmin, s.kmax, cs, page_size=0, block_table=bt)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        page_scores(q, s.kmin, s.kmax, cs.long(), page_size=4, block_table=bt)
    with pytest.raises(ValueError, match=r"kmin's pages \(7\) must be B \(2\)"):
        page_scores(q, s.kmin[:7], s.kmax[:7], cs, page_size=4)


def test_decode_attention_keeps_the_summary_current():
    """decode_attention(page_summary=) writes k, then recomputes the touched pages; a summary built
    for another page size is refused before anything is written."""
    ps = 4
    kc, bt, cs = _paged(2, 2, 8, [7, 8], ps, seed=11)
    vc = torch.randn_like(kc)
    s = page_summary(kc, cs, block_table=bt)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 2, 8, generator=g) * 3, torch.randn(2, 2, 2, 8)
    out = posattn.decode_attention(q, kc, vc, cs, block_table=bt, k=k, v=v, page_summary=s)
    assert out.shape == q.shape
    for (b, p), (page, mn, mx) in _oracle_summary(kc, bt, cs + 2, ps).items():
        assert torch.equal(s.kmin[page], mn) and torch.equal(s.kmax[page], mx), (b, p)
    other = page_summary(kc.reshape(-1, 2, 2, 8), cs, block_table=torch.zeros(2, 8, dtype=torch.int32))
    before = kc.clone()
    with pytest.raises(ValueError, match="summary was built for page_size 2"):
        posattn.decode_attention(q, kc, vc, cs + 2, block_table=bt, k=k, v=v, page_summary=other)
    assert torch.equal(kc, before)
    with pytest.raises(ValueError, match="page_summary needs k="):
        posattn.decode_attention(q, kc, vc, cs, block_table=bt, page_summary=s)


def _slots(bt, starts, counts, ps, pad=0):
    """int64 [sum(counts) + pad]: request b's tokens at logical slots starts[b] .. + counts[b], then -1 padding."""
    out = []
    for b, (s0, n) in enumerate(zip(starts, counts)):
        out += [int(bt[b, s // ps]) * ps + s % ps for s in range(s0, s0 + n)]
    return torch.tensor(out + [-1] * pad, dtype=torch.int64)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_rope_and_cache_keeps_the_summary_current(kv_layout):
    """rope_and_cache(page_summary=) after a ragged prefill (with -1 padding) and decode steps: every
    page a request covers equals a fresh summary's; pages hold random stale rows before (reuse)."""
    ps, B, HK, HQ, D = 4, 3, 2, 4, 8
    kc, bt, _ = _paged(B, HK, D, [13, 13, 13], ps, seed=11)
    vc = torch.randn_like(kc)
    if kv_layout == "HND":
        kc, vc = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    nhd = (lambda c: c if kv_layout == "NHD" else c.transpose(1, 2))
    spec = posattn.RopeSpec(head_dim=D)
    summ = page_summary(nhd(kc), torch.zeros(B, dtype=torch.int32), block_table=bt)   # stale pages everywhere
    g = torch.Generator().manual_seed(2)
    L = [0, 0, 0]
    for counts in ([5, 1, 8], [1, 1, 1], [0, 3, 1], [1, 1, 1]):
        sl = _slots(bt, L, counts, ps, pad=2)
        T = sl.shape[0]
        pos = torch.tensor([p for b in range(B) for p in range(L[b], L[b] + counts[b])] + [0, 0])
        q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HK, HK))
        posattn.rope_and_cache(q, k, v, pos, spec, kc, vc, sl, kv_layout=kv_layout, page_summary=summ)
        L = [a + c for a, c in zip(L, counts)]
        cs = torch.tensor(L, dtype=torch.int32)
        for (b, p), (page, mn, mx) in _oracle_summary(nhd(kc), bt, cs, ps).items():
            assert torch.equal(summ.kmin[page], mn) and torch.equal(summ.kmax[page], mx), (counts, b, p)


def test_rope_and_cache_summary_all_padding_and_bad_summary():
    ps = 4
    kc, bt, _ = _paged(1, 1, 8, [8], ps, seed=3)
    vc = torch.randn_like(kc)
    cs = torch.tensor([5], dtype=torch.int32)
    summ = page_summary(kc, cs, block_table=bt)
    before = (summ.kmin.clone(), summ.kmax.clone())
    spec = posattn.RopeSpec(head_dim=8)
    x = torch.randn(2, 1, 8)
    posattn.rope_and_cache(x, x, x, torch.tensor([5, 6]), spec, kc, vc, torch.tensor([-1, -1]), page_summary=summ)
    assert torch.equal(summ.kmin, before[0]) and torch.equal(summ.kmax, before[1])
    other = page_summary(kc.reshape(-1, 2, 1, 8), torch.tensor([5], dtype=torch.int32),
                         block_table=torch.arange(kc.shape[0] * 2, dtype=torch.int32)[None])
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="summary was built for page_size 2"):
        posattn.rope_and_cache(x, x, x, torch.tensor([5, 6]), spec, kc, vc, torch.tensor([5, 6]), page_summary=other)
    assert torch.equal(kc, kc0)                         # refused before the write
    with pytest.raises(TypeError, match="summary must be a posattn.select.PageSummary"):
        posattn.rope_and_cache(x, x, x, torch.tensor([5, 6]), spec, kc, vc, torch.tensor([5, 6]), page_summary=(1, 2))


def test_rope_and_cache_summary_with_vq_codes():
    """page_summary= and codebook=/codes= together: the summary follows the write, the codes are written."""
    from posattn import vq

    ps, HK, D = 4, 2, 16
    kc, bt, _ = _paged(1, HK, D, [8], ps, seed=12)
    vc = torch.randn_like(kc)
    summ = page_summary(kc, torch.zeros(1, dtype=torch.int32), block_table=bt)
    g = torch.Generator().manual_seed(1)
    cb = vq.fit(torch.randn(100, HK, D, generator=g), None, 5, iters=1)
    codes = torch.full(kc.shape[:3], -7, dtype=torch.int16)
    sl = _slots(bt, [0], [6], ps)
    q, k, v = torch.randn(6, 4, D, generator=g), torch.randn(6, HK, D, generator=g), torch.randn(6, HK, D, generator=g)
    posattn.rope_and_cache(q, k, v, torch.arange(6), posattn.RopeSpec(head_dim=D), kc, vc, sl, rotate_k=False,
                           codebook=cb, codes=codes, page_summary=summ)
    for (b, p), (page, mn, mx) in _oracle_summary(kc, bt, torch.tensor([6], dtype=torch.int32), ps).items():
        assert torch.equal(summ.kmin[page], mn) and torch.equal(summ.kmax[page], mx), (b, p)
    assert torch.equal(codes.view(-1, HK)[sl], vq.assign(k, cb))

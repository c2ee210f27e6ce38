"""Lowering of structured masks to block lists, checked against the explicit boolean mask."""
import random

import pytest
import torch

from posattn.attention.masks import MaskSpec, dense_from_lists, lower
from tests.attention.layouts import random_layout


def _block_truth(mask: torch.Tensor, bm: int, bn: int):
    """(any allowed, all allowed) per (query block, key block) tile of the dense mask."""
    T = mask.shape[0]
    nqb, nkb = -(-T // bm), -(-T // bn)
    any_ = torch.zeros(nqb, nkb, dtype=torch.bool)
    all_ = torch.zeros(nqb, nkb, dtype=torch.bool)
    for a in range(nqb):
        for b in range(nkb):
            tile = mask[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            any_[a, b] = tile.any()
            # a tile cut by the end of the tokens is never "all allowed": its padding must be masked
            all_[a, b] = bool(tile.all()) and tile.shape == (bm, bn)
    return any_, all_


def _rule_unmasked(qb, kb, bm, bn, T, cs, cr, spec) -> bool:
    """The lowering's documented rule for a block that needs no element mask, written out: a
    whole (bm x bn) tile inside the tokens whose queries share one document holding the whole
    key block (causality and the window holding at its corners), or whose queries share one
    row whose anchor prefix holds the whole key block (causality at its corner)."""
    m0, m1, n0, n1 = qb * bm, qb * bm + bm, kb * bn, kb * bn + bn
    if m1 > T or n1 > T:
        return False
    seg = lambda b, t: next(a for a, z in zip(b[:-1], b[1:]) if a <= t < z)  # noqa: E731  (segment start)
    causal_ok = not spec.causal or n1 - 1 <= m0
    d0, d1 = seg(cs, m0), seg(cs, m1 - 1)
    doc_end = next(z for a, z in zip(cs[:-1], cs[1:]) if a == d0 and z > a)
    doc = d0 == d1 and seg(cs, n0) == d0 and n1 <= doc_end and causal_ok
    if spec.window is not None:
        doc = doc and (m1 - 1) - n0 < spec.window and (spec.causal or (n1 - 1) - m0 < spec.window)
    r0, r1 = seg(cr, m0), seg(cr, m1 - 1)
    anchor = r0 == r1 and n0 >= r0 and n1 <= r0 + spec.num_anchors and causal_ok
    return doc or anchor


@pytest.mark.parametrize("seed", range(6))
def test_lists_visit_exactly_the_blocks_with_allowed_pairs(seed):
    rng = random.Random(seed)
    for _ in range(8):
        T = rng.randint(1, 160)
        na = rng.choice([0, 1, 1, 3])
        n_rows = rng.randint(1, max(1, min(6, T // max(na, 1))))
        cu, rows = random_layout(rng, T, n_rows, na, max_docs=rng.randint(1, 8))
        spec = MaskSpec(causal=rng.random() < 0.7, num_anchors=na,
                        window=rng.choice([None, None, 1, 2, 7, 40]))
        bm, bn = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        lists = lower(spec, cu, rows, T, bm, bn)
        mask = spec.dense(T, cu, rows)
        any_, all_ = _block_truth(mask, bm, bn)
        idx = [[] for _ in range(any_.shape[0])]
        off = lists.q_offsets.tolist()
        kv = lists.q_kv_idx.tolist()
        flags = lists.q_kv_masked.tolist()
        nfull = lists.q_nfull.tolist()
        for qb in range(any_.shape[0]):
            for e in range(off[qb], off[qb + 1]):
                idx[qb].append(kv[e])
                # an entry left unmasked must be allowed everywhere
                if not flags[e]:
                    assert all_[qb, kv[e]], (spec, cu.tolist(), rows.tolist(), qb, kv[e])
            # unmasked blocks first (nfull of them), each group ascending, no repeats
            f = flags[off[qb]:off[qb + 1]]
            assert f == sorted(f) and f.count(0) == nfull[qb]
            assert idx[qb][:nfull[qb]] == sorted(idx[qb][:nfull[qb]])
            assert idx[qb][nfull[qb]:] == sorted(idx[qb][nfull[qb]:])
            assert len(set(idx[qb])) == len(idx[qb])
            # every block holding an allowed pair is visited, and no fully masked block is
            listed = torch.zeros(any_.shape[1], dtype=torch.bool)
            listed[idx[qb]] = True
            assert torch.equal(listed, any_[qb]), (spec, cu.tolist(), rows.tolist(), bm, bn, qb)
        # exactly the blocks the documented rule calls unmasked are listed without the mask
        unmasked = {(qb, kv[e]) for qb in range(any_.shape[0]) for e in range(off[qb], off[qb + 1]) if not flags[e]}
        expected = {(a, b) for a in range(any_.shape[0]) for b in range(any_.shape[1])
                    if _rule_unmasked(a, b, bm, bn, T, cu.tolist(), rows.tolist(), spec)}
        assert unmasked == expected, (spec, cu.tolist(), rows.tolist(), bm, bn)
        # the key-major lists are the transpose of the query-major ones
        kq = {(q, k, f) for q in range(len(idx)) for k, f in zip(idx[q], flags[off[q]:off[q + 1]])}
        koff = lists.k_offsets.tolist()
        kq2 = {(q, kb, f) for kb in range(len(koff) - 1)
               for q, f in zip(lists.k_q_idx.tolist()[koff[kb]:koff[kb + 1]],
                               lists.k_q_masked.tolist()[koff[kb]:koff[kb + 1]])}
        assert kq == kq2
        kn = lists.k_nfull.tolist()
        for kb in range(len(koff) - 1):
            f = lists.k_q_masked.tolist()[koff[kb]:koff[kb + 1]]
            assert f == sorted(f) and f.count(0) == kn[kb]


def test_dense_expansion_covers_the_mask():
    cu = torch.tensor([0, 1, 9, 10, 30, 31, 50], dtype=torch.int32)
    rows = torch.tensor([0, 10, 31, 50], dtype=torch.int32)
    spec = MaskSpec(causal=True, num_anchors=1, window=6)
    lists = lower(spec, cu, rows, 50, 16, 16)
    visited, masked = dense_from_lists(lists, 50)
    mask = spec.dense(50, cu, rows)
    assert not (mask & ~visited).any()
    assert not (~mask & visited & ~masked).any()


def test_spec_is_hashable_and_validates():
    assert hash(MaskSpec()) == hash(MaskSpec(causal=True, num_anchors=1, window=None))
    assert len({MaskSpec(), MaskSpec(window=4), MaskSpec()}) == 2
    with pytest.raises(ValueError, match="window"):
        MaskSpec(window=0)
    with pytest.raises(ValueError, match="num_anchors"):
        MaskSpec(num_anchors=-1)
    with pytest.raises(TypeError, match="causal"):
        MaskSpec(causal=1)


def test_one_host_sync_sized_lists_scale_with_visited_blocks():
    # 8 documents of 512 tokens, causal: each query block visits only its own document's blocks
    T, bm, bn = 4096, 128, 64
    cu = torch.arange(0, T + 1, 512, dtype=torch.int32)
    lists = lower(MaskSpec(causal=True, num_anchors=0), cu, torch.tensor([0, T], dtype=torch.int32), T, bm, bn)
    per_doc = sum(-(-(qb * bm + bm) // bn) for qb in range(512 // bm))
    assert lists.nnz == 8 * per_doc
    assert lists.nnz < (T // bm) * (T // bn) // 4


def test_counts_are_deterministic_and_never_use_bincount(monkeypatch):
    """torch.bincount with weights is non-deterministic on CUDA and raises under
    torch.use_deterministic_algorithms(True): the lowering counts without it."""
    def no_bincount(*a, **kw):
        raise AssertionError("torch.bincount in the lowering")
    monkeypatch.setattr(torch, "bincount", no_bincount)
    cu = torch.tensor([0, 3, 20, 21, 50], dtype=torch.int32)
    rows = torch.tensor([0, 20, 50], dtype=torch.int32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        lists = lower(MaskSpec(num_anchors=2, window=9), cu, rows, 50, 16, 16)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert int(lists.q_nfull.sum()) + int(lists.q_kv_masked.sum()) == lists.nnz
    assert int(lists.k_nfull.sum()) == int(lists.q_nfull.sum())
    assert lists.k_offsets.dtype == torch.int32 and int(lists.k_offsets[-1]) == lists.nnz


def test_lists_that_outgrow_int32_offsets_are_refused(monkeypatch):
    """The kernels index the lists with int32: a lowering past that raises instead of wrapping."""
    from posattn.attention import masks

    cu = torch.tensor([0, 64], dtype=torch.int32)
    rows = torch.tensor([0, 64], dtype=torch.int32)
    n = lower(MaskSpec(), cu, rows, 64, 16, 16).nnz
    monkeypatch.setattr(masks, "MAX_LIST_ENTRIES", n - 1)
    with pytest.raises(ValueError, match="more than the int32 offsets"):
        lower(MaskSpec(), cu, rows, 64, 16, 16)

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
        # the interior of the rows' documents is recognised as unmasked (no needless masking)
        unmasked = sum(1 for f in flags if not f)
        assert unmasked >= int((all_ & any_).sum()) - 2 * any_.shape[0] - 2
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

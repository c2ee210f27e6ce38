"""The ring plan: which blocks are computed and sent, against the dense mask (no process group)."""
import random

import pytest
import torch

from posattn import distributed as D
from posattn.kernels.reference.attention import build_mask
from tests.attention.layouts import random_layout


def brute_visible(cu, rows, na, causal, window, W, shard):
    T = int(cu[-1])
    m = build_mask(T, cu, rows, na, causal, window)
    rs = torch.tensor(rows.tolist())[torch.searchsorted(rows.to(torch.int64), torch.arange(T), right=True) - 1]
    anchor = torch.arange(T) < rs + na
    idx = [D.shard_indices(T, W, r, shard, cu_seqlens=cu) for r in range(W)]
    return [[r == s or bool(m[idx[r]][:, idx[s]][:, ~anchor[idx[s]]].any()) for s in range(W)] for r in range(W)]


@pytest.mark.parametrize("shard", ["zigzag", "contiguous", "zigzag_doc"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_visibility_equals_the_dense_mask(shard, W):
    rng = random.Random(W * 7 + len(shard))
    for _ in range(40):
        T = rng.randint(6, 60)
        na = rng.choice([0, 1, 2])
        cu, rows = random_layout(rng, T, rng.randint(1, 3), na, max_docs=rng.randint(1, 6))
        causal = rng.random() < 0.6
        window = rng.choice([None, 1, 3, 8])
        plan = D.plan_ring(cu, rows, na, causal, window, W, shard)
        want = brute_visible(cu, rows, na, causal, window, W, shard)
        assert [list(v) for v in plan.visible] == want, (cu.tolist(), rows.tolist(), na, causal, window)
        A = sorted(t for r0, r1 in zip(rows.tolist(), rows.tolist()[1:]) for t in range(r0, min(r1, r0 + na)))
        assert plan.anchor_index.tolist() == A


def test_many_short_documents_skip_most_of_the_ring():
    # 64 documents of 16 tokens over 8 ranks (128 tokens each, contiguous): no document crosses
    # a shard boundary, so no block leaves its rank
    cu = torch.arange(0, 1025, 16, dtype=torch.int32)
    rows = torch.tensor([0, 1024], dtype=torch.int32)
    plan = D.plan_ring(cu, rows, 0, True, None, 8, "contiguous")
    assert all(plan.blocks(r) == 1 for r in range(8))
    assert not any(send or recv for r in range(8) for _, _, send, _, recv in plan.steps(r))
    # documents of 100 tokens cross boundaries: each rank sees at most its left neighbour
    cu = torch.tensor(list(range(0, 1024, 100)) + [1024], dtype=torch.int32)
    plan = D.plan_ring(cu, rows, 0, True, None, 8, "contiguous")
    assert [plan.blocks(r) for r in range(8)] == [1] + [2] * 7


def test_zigzag_doc_balances_many_documents():
    """Documents of 512, 512 and 1024 tokens on 4 ranks: zigzag over the step gives ranks 0 and 1
    the long document's late chunks (about twice the causal work of ranks 2 and 3); zigzag_doc
    gives every rank the same causal work (unmasked pairs), the total / W."""
    cu = torch.tensor([0, 512, 1024, 2048], dtype=torch.int32)
    rows = torch.tensor([0, 2048], dtype=torch.int32)
    m = build_mask(2048, cu, rows, 0, True, None)
    work = {sh: [int(m[D.shard_indices(2048, 4, r, sh, cu_seqlens=cu)].sum()) for r in range(4)]
            for sh in ("zigzag", "zigzag_doc")}
    assert len(set(work["zigzag_doc"])) == 1 and sum(work["zigzag_doc"]) == int(m.sum())
    assert max(work["zigzag"]) > 1.5 * min(work["zigzag"])
    plan = D.plan_ring(cu, rows, 0, True, None, 4, "zigzag_doc")
    assert all(plan.visible[r][s] for r in range(4) for s in range(4))     # every rank holds part of every doc

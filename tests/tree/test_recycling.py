"""Token Recycling: template, breadth-first draft, update from the target's top-k."""
from __future__ import annotations

import pytest
import torch

from posattn.tree import Tree, TokenRecycling, default_template
from tests.conftest import DEVICE


def test_default_template_is_an_80_node_tree():
    parents, ranks = default_template()
    t = Tree.from_parents(parents)
    assert t.num_nodes == 80 and 1 <= t.max_depth <= 6
    # breadth-first numbering and rank order among siblings
    assert t.depth.tolist() == sorted(t.depth.tolist())
    for i in range(1, 80):
        sib = int(t.next_sibling[i])
        assert sib == -1 or ranks[sib] > ranks[i]
    assert sorted(ranks[j] for j in range(80) if parents[j] == 0) == list(range(8))


def test_draft_follows_the_adjacency_matrix():
    tr = TokenRecycling(50, k=2, template=([-1, 0, 0, 1, 2], [0, 0, 1, 1, 0]))
    tr.adjacency[:] = torch.arange(50)[:, None] * 0 + torch.tensor([1, 2])
    tr.adjacency[7] = torch.tensor([10, 11])
    tr.adjacency[10] = torch.tensor([20, 21])
    tr.adjacency[11] = torch.tensor([30, 31])
    tok, b = tr.draft(torch.tensor([7, 3]))
    assert tok.view(2, 5)[0].tolist() == [7, 10, 11, 21, 30]
    assert tok.view(2, 5)[1].tolist() == [3, 1, 2, 2, 1]
    assert b.cu_seqlens_q.tolist() == [0, 5, 10]
    logits = torch.zeros(10, 50)
    logits[0, 40], logits[0, 41] = 5, 4     # after token 7: 40 then 41
    logits[1, 42], logits[1, 43] = 1, 3     # after token 10: 43 then 42
    tr.update(tok, logits, b)
    assert tr.adjacency[7].tolist() == [40, 41] and tr.adjacency[10].tolist() == [43, 42]


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenRecycling(0)
    with pytest.raises(ValueError, match="k must"):
        TokenRecycling(10, k=11)
    with pytest.raises(ValueError, match="node 2 has 3"):
        TokenRecycling(10, k=2, template=([-1, 0, 0], [0, 1, 3]))
    with pytest.raises(ValueError, match="second root"):
        TokenRecycling(10, k=2, template=([-1, -1], [0, 0]))
    tr = TokenRecycling(10, k=2)
    with pytest.raises(ValueError, match="target_logits"):
        tr.update(torch.zeros(80, dtype=torch.int64), torch.zeros(80, 9), tr.batch(1))


def test_token_recycling_no_host_sync():
    from tests.tree.test_verify import _NoSync

    tr = TokenRecycling(50, device=DEVICE)
    tr.batch(3)                                   # packed once per batch size (host -> device)
    last = torch.tensor([1, 2, 3], device=DEVICE)
    with _NoSync():
        tok, b = tr.draft(last)
        tr.update(tok, torch.randn(tok.shape[0], 50, device=DEVICE), b)
        tok2, _ = tr.draft(last)
    assert tok2.shape == (3 * 80,)

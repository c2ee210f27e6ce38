"""verify_greedy vs a sequential oracle, on the device without host syncs."""
from __future__ import annotations

import random

import pytest
import torch

from posattn.tree import Tree, pack, verify_greedy
from tests.conftest import DEVICE
from tests.tree.test_tree import random_parents


def oracle(parents, draft, target):
    """Walk from the root: the first child (index order) whose token is the target's argmax."""
    path = [0]
    while True:
        cur = path[-1]
        nxt = next((j for j in range(len(parents)) if parents[j] == cur and draft[j] == target[cur]), None)
        if nxt is None:
            return path, target[cur]
        path.append(nxt)


class _NoSync:
    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "cpu")}

        def boom(*a, **k):
            raise AssertionError("host sync in verify_greedy")

        for n in self.saved:
            setattr(torch.Tensor, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("seed", range(6))
def test_verify_greedy_matches_oracle(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 3, 9, 40, 70]) for _ in range(rng.randint(1, 5))]
    trees = [Tree.from_parents(random_parents(T, rng)) for T in sizes]
    b = pack(trees, DEVICE)
    V = 3  # few tokens: many matches, several children match at once
    draft = torch.randint(0, V, (b.total_nodes,), device=DEVICE)
    target = torch.randint(0, V, (b.total_nodes,), device=DEVICE)
    with _NoSync():
        idx, n, bonus = verify_greedy(draft, target, b)
    assert idx.dtype == torch.int32 and n.dtype == torch.int32 and bonus.dtype == torch.int64
    assert idx.shape == (len(trees), b.max_depth + 1)
    d, t = draft.tolist(), target.tolist()
    for i, tree in enumerate(trees):
        o = int(b.cu_seqlens_q[i])
        path, bon = oracle(tree.parents.tolist(), d[o:o + sizes[i]], t[o:o + sizes[i]])
        assert idx[i].tolist() == path + [-1] * (b.max_depth + 1 - len(path))
        assert int(n[i]) == len(path) and int(bonus[i]) == bon


def test_verify_greedy_bad_input():
    b = pack([Tree.from_parents([-1, 0])])
    with pytest.raises(ValueError, match="draft_tokens must be"):
        verify_greedy(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), b)
    with pytest.raises(TypeError, match="target_tokens"):
        verify_greedy(torch.zeros(2, dtype=torch.int64), torch.zeros(2), b)

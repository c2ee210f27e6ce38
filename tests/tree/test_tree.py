"""Tree.from_parents and pack vs brute-force oracles; bad parents name the node."""
from __future__ import annotations

import random

import pytest
import torch

from posattn.tree import Tree, pack


def random_parents(T, rng):
    return [-1] + [rng.randrange(i) for i in range(1, T)]


def _ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@pytest.mark.parametrize("T", [1, 2, 7, 31, 32, 33, 80, 97])
def test_from_parents_matches_brute_force(T):
    rng = random.Random(T)
    parents = random_parents(T, rng)
    t = Tree.from_parents(parents)
    W = (T + 31) // 32
    assert t.mask.dtype == torch.int32 and t.mask.shape == (T, W)
    words = t.mask.to(torch.int64) & 0xFFFFFFFF
    for i in range(T):
        seen = {j for j in range(T) if (int(words[i, j // 32]) >> (j % 32)) & 1}
        assert seen == _ancestors(parents, i), i
        assert int(t.depth[i]) == len(_ancestors(parents, i)) - 1
        kids = [j for j in range(T) if parents[j] == i]
        assert int(t.first_child[i]) == (kids[0] if kids else -1)
    for i in range(1, T):
        sibs = [j for j in range(T) if parents[j] == parents[i]]
        pos = sibs.index(i)
        assert int(t.next_sibling[i]) == (sibs[pos + 1] if pos + 1 < len(sibs) else -1)
    assert int(t.next_sibling[0]) == -1
    leaves = [i for i in range(T) if i not in parents]
    assert t.paths.shape == (len(leaves), t.max_depth + 1)
    for row, leaf in zip(t.paths.tolist(), leaves):
        path = [n for n in row if n >= 0]
        assert path[-1] == leaf and path[0] == 0
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
        assert all(n == -1 for n in row[len(path):])


@pytest.mark.parametrize("parents,msg", [
    ([0, 0], "node 0 must be the root"),
    ([-1, 0, -1], "node 2 is a second root"),
    ([-1, 2, 1], "node 1 is on a cycle"),
    ([-1, 0, 3, 1], "node 2's parent 3 is not an earlier node"),
    ([-1, 0, 5], "node 2 has parent 5"),
    ([-1, -3], "node 1 has parent -3"),
    ([], "at least one node"),
])
def test_bad_parents(parents, msg):
    with pytest.raises(ValueError, match=msg):
        Tree.from_parents(parents)


def test_bad_parent_types():
    with pytest.raises(TypeError, match="parents"):
        Tree.from_parents([-1.0, 0.0])
    with pytest.raises(TypeError, match="parents"):
        Tree.from_parents(torch.zeros(2, 2, dtype=torch.int64))


def test_pack():
    rng = random.Random(0)
    trees = [Tree.from_parents(random_parents(T, rng)) for T in (5, 40, 1)]
    b = pack(trees, "cpu")
    assert b.cu_seqlens_q.tolist() == [0, 5, 45, 46] and b.cu_seqlens_q.dtype == torch.int32
    assert b.tree_mask.shape == (46, 2) and b.depth.shape == (46,)
    assert torch.equal(b.tree_mask[5:45], trees[1].mask)
    assert torch.equal(b.tree_mask[:5, 0], trees[0].mask[:, 0]) and not b.tree_mask[:5, 1].any()
    assert b.max_depth == max(t.max_depth for t in trees)
    cs = torch.tensor([10, 0, 7], dtype=torch.int32)
    pos = b.positions(cs)
    assert pos[:5].tolist() == (10 + trees[0].depth).tolist() and pos[45].item() == 7
    assert b.parent_global[5:45].tolist() == [-1] + [p + 5 for p in trees[1].parents[1:].tolist()]
    with pytest.raises(ValueError, match="at least one"):
        pack([])
    with pytest.raises(TypeError, match=r"trees\[0\]"):
        pack([[-1, 0]])

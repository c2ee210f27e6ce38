"""Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of
Large Language Models with Token Recycling", 2024): a training-free drafter.

An adjacency matrix ``M [V, k]`` on the device holds, for every token, the k tokens the
target model most recently ranked highest after it (the "trash" of past verifications:
top-k candidates that were computed anyway). A draft is a static template tree filled by
breadth-first lookup: a node of rank r under a node holding token x holds ``M[x, r]``.
After each verification, ``M[x]`` for every drafted token x is replaced by the target's
top-k at that node.

Default template (documented here; the paper's exact tree is not reproduced): the 80
root-to-node rank paths (r1, ..., rd) with the highest product of per-rank weights
``w = (.45, .2, .1, .07, .05, .04, .03, .03)`` (a typical acceptance rate of the r-th
candidate), found best-first, depth at most 6. A path's weight is below its prefix's, so
the set is prefix-closed, i.e. a tree; nodes are numbered breadth-first.
"""
from __future__ import annotations

import heapq

import torch

from posattn import _validate as V
from posattn.tree.batch import TreeBatch, pack
from posattn.tree.tree import Tree

RANK_WEIGHTS = (0.45, 0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.03)


def default_template(num_nodes: int = 80, k: int = 8, max_depth: int = 6) -> tuple[list[int], list[int]]:
    """(parents, ranks) of the default template: ``num_nodes`` nodes including the root."""
    w = RANK_WEIGHTS[:k] + (RANK_WEIGHTS[-1],) * max(0, k - len(RANK_WEIGHTS))
    heap = [(-w[r], (r,)) for r in range(k)]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < num_nodes - 1:
        negp, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(k):
                heapq.heappush(heap, (negp * w[r], path + (r,)))
    chosen.sort(key=lambda p: (len(p), p))          # breadth-first numbering
    index = {(): 0}
    parents, ranks = [-1], [0]
    for path in chosen:
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
    return parents, ranks


class TokenRecycling:
    """The Token Recycling drafter.

    Args:
        vocab_size: V.
        k: candidates kept per token (the adjacency matrix is int64 [V, k]).
        template: (parents, ranks) of the static draft tree (node 0 the root; ranks[i] < k is
            which candidate of its parent's token node i takes), or None for
            :func:`default_template`.
        device: where the matrix lives.
    """

    def __init__(self, vocab_size: int, k: int = 8, template=None, device=None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= vocab_size:
            raise ValueError(f"k must be an int in [1, vocab_size], got {k!r}")
        parents, ranks = default_template(k=k) if template is None else template
        if len(parents) != len(ranks):
            raise ValueError(f"template parents and ranks must have one entry per node; got {len(parents)} "
                             f"and {len(ranks)}")
        bad = [i for i, r in enumerate(ranks) if i and not 0 <= int(r) < k]
        if bad:
            raise ValueError(f"template ranks must be in [0, k) = [0, {k}); node {bad[0]} has {ranks[bad[0]]}")
        self.vocab_size, self.k = vocab_size, k
        self.tree = Tree.from_parents(list(parents))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # a fresh matrix proposes token ids 0..k-1 (never accepted in practice) until the
        # target's top-k fill it in
        self.adjacency = torch.arange(k, device=self.device).repeat(vocab_size, 1)
        self._ranks = torch.tensor([int(r) for r in ranks], device=self.device)
        self._levels = [torch.nonzero(self.tree.depth == d).flatten().to(self.device)
                        for d in range(1, self.tree.max_depth + 1)]
        self._parents = self.tree.parents.long().to(self.device)
        self._batches: dict = {}

    def batch(self, B: int) -> TreeBatch:
        """The template packed B times (kept per B)."""
        tb = self._batches.get(B)
        if tb is None:
            tb = self._batches[B] = pack([self.tree] * B, self.device)
        return tb

    def draft(self, last_tokens: torch.Tensor):
        """last_tokens int64 [B] (each request's last accepted token, the roots) ->
        (draft_tokens int64 [B * T], TreeBatch); breadth-first lookups, one per tree level."""
        V.int_tensor(last_tokens, "last_tokens")
        if last_tokens.dim() != 1:
            raise ValueError(f"last_tokens must be [B]; got shape {tuple(last_tokens.shape)}")
        B, T = last_tokens.shape[0], self.tree.num_nodes
        tok = torch.empty(B, T, dtype=torch.int64, device=self.device)
        tok[:, 0] = last_tokens.to(self.device)
        for nodes in self._levels:
            tok[:, nodes] = self.adjacency[tok[:, self._parents[nodes]], self._ranks[nodes]]
        return tok.reshape(-1), self.batch(B)

    def update(self, draft_tokens: torch.Tensor, target_logits: torch.Tensor, batch: TreeBatch) -> None:
        """Recycle the target's top-k after every drafted node: M[draft_tokens[i]] = topk(target_logits[i])."""
        if target_logits.dim() != 2 or target_logits.shape != (draft_tokens.shape[0], self.vocab_size):
            raise ValueError(f"target_logits must be [ΣT, V] = [{draft_tokens.shape[0]}, {self.vocab_size}]; "
                             f"got {tuple(target_logits.shape)}")
        top = target_logits.topk(self.k, dim=-1).indices
        self.adjacency[draft_tokens.to(self.device)] = top.to(self.device)

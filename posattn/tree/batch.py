"""TreeBatch (packed draft trees of a batch, on the device) and greedy verification."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn.tree.tree import Tree


@dataclass(frozen=True, eq=False)
class TreeBatch:
    """B draft trees packed for ``posattn.decode_attention`` (ΣT nodes in all).

    Device tensors:
        tree_mask: int32 [ΣT, W], W = ceil(max T_b / 32): bit j of row i = node i may see
            node j of its own tree (self and ancestors), j a local index.
        depth: int32 [ΣT]: the new tokens' positions are ``cache_seqlens[b] + depth``.
        cu_seqlens_q: int32 [B + 1]: request b's nodes are rows cu_seqlens_q[b] .. [b+1].
        parents: int32 [ΣT]: local parent index (-1 for roots).
        parent_global: int64 [ΣT]: row of the parent in the packed batch (-1 for roots).
        batch_index: int64 [ΣT]: the request of each node.
    Host values: num_nodes (per request), max_depth (deepest node over the batch).
    """

    tree_mask: torch.Tensor
    depth: torch.Tensor
    cu_seqlens_q: torch.Tensor
    parents: torch.Tensor
    parent_global: torch.Tensor
    batch_index: torch.Tensor
    num_nodes: tuple
    max_depth: int

    @property
    def batch_size(self) -> int:
        return len(self.num_nodes)

    @property
    def total_nodes(self) -> int:
        return sum(self.num_nodes)

    def positions(self, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """int64 [ΣT]: cache_seqlens[b] + depth of each node (the new tokens' rotary positions)."""
        return cache_seqlens.long()[self.batch_index] + self.depth


def pack(trees, device=None) -> TreeBatch:
    """Pack a list of :class:`Tree` into a :class:`TreeBatch` on ``device`` (one host-to-device copy each)."""
    trees = list(trees)
    if not trees:
        raise ValueError("trees must hold at least one Tree")
    for i, t in enumerate(trees):
        if not isinstance(t, Tree):
            raise TypeError(f"trees[{i}] must be a posattn.tree.Tree, got {type(t).__name__}")
    sizes = [t.num_nodes for t in trees]
    W = (max(sizes) + 31) // 32
    mask = torch.cat([torch.nn.functional.pad(t.mask, (0, W - t.mask.shape[1])) for t in trees])
    cu = torch.zeros(len(trees) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(sizes), 0)
    parents = torch.cat([t.parents for t in trees])
    offs = torch.repeat_interleave(cu[:-1].long(), torch.tensor(sizes))
    pg = torch.where(parents >= 0, parents.long() + offs, torch.full_like(offs, -1))
    bidx = torch.repeat_interleave(torch.arange(len(trees)), torch.tensor(sizes))
    depth = torch.cat([t.depth for t in trees])
    mv = lambda x: x.to(device) if device is not None else x  # noqa: E731
    return TreeBatch(mv(mask), mv(depth), mv(cu), mv(parents), mv(pg), mv(bidx), tuple(sizes),
                     int(depth.max()))


def verify_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, batch: TreeBatch):
    """Greedy acceptance of each request's draft tree against the target model's argmax.

    Args:
        draft_tokens: int64 [ΣT]: the token at each node (a root holds the last accepted token).
        target_tokens: int64 [ΣT]: the target model's argmax after each node.
        batch: the :class:`TreeBatch` the trees were packed into.

    A child j of an accepted node i is accepted when draft_tokens[j] == target_tokens[i]
    (the first such child in sibling (index) order); the root is always accepted.

    Returns:
        accept_index: int32 [B, max_depth + 1]: accepted local node indices from the root, -1 padded.
        accept_len: int32 [B]: accepted nodes, root included (the new tokens are the accepted
            drafts and the bonus: accept_len tokens).
        bonus: int64 [B]: target_tokens at the last accepted node.
    Runs on the device with a fixed number of launches (max_depth steps): no host sync.
    """
    for name, x in (("draft_tokens", draft_tokens), ("target_tokens", target_tokens)):
        V.int_tensor(x, name)
        if x.shape != (batch.total_nodes,):
            raise ValueError(f"{name} must be [ΣT] = [{batch.total_nodes}] (the batch's nodes); got {tuple(x.shape)}")
    V.same_device(draft_tokens, "draft_tokens", target_tokens=target_tokens, tree_mask=batch.tree_mask)
    dev, B, N = draft_tokens.device, batch.batch_size, batch.total_nodes
    start = batch.cu_seqlens_q[:-1].long()
    pg, bidx = batch.parent_global, batch.batch_index
    target_tokens = target_tokens.long()
    # a node can be accepted only when its token is what the target predicted after its parent
    match = (pg >= 0) & (draft_tokens.long() == target_tokens[pg.clamp(min=0)])
    node = torch.arange(N, device=dev)
    none = torch.full((B,), N, dtype=torch.int64, device=dev)
    cur = start.clone()
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    accept_index = torch.full((B, batch.max_depth + 1), -1, dtype=torch.int32, device=dev)
    accept_index[:, 0] = 0
    for step in range(batch.max_depth):
        cand = match & (pg == cur[bidx]) & alive[bidx]
        best = none.scatter_reduce(0, bidx, torch.where(cand, node, N), reduce="amin")
        alive = alive & (best < N)
        cur = torch.where(alive, best, cur)
        accept_index[:, step + 1] = torch.where(alive, cur - start, -1).to(torch.int32)
    accept_len = (accept_index >= 0).sum(1, dtype=torch.int32)
    return accept_index, accept_len, target_tokens[cur]

"""Tree: one request's draft tree, from its parent array."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posattn.tree import _build


@dataclass(frozen=True, eq=False)
class Tree:
    """A draft tree of T nodes. Node 0 is the root (the last accepted token, not yet in the
    cache); every other node's parent is an earlier node.

    Attributes (host tensors):
        parents: int32 [T] (parents[0] = -1).
        mask: int32 [T, ceil(T/32)]: bit j of row i (word j // 32, bit j % 32) set when node j
            is node i itself or one of its ancestors.
        depth: int32 [T], root 0.
        paths: int32 [n_leaves, max_depth + 1]: root-to-leaf node indices, -1 padded.
        first_child, next_sibling: int32 [T], -1 for none; siblings in index order.
    """

    parents: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    paths: torch.Tensor
    first_child: torch.Tensor
    next_sibling: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[0]

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @classmethod
    def from_parents(cls, parents) -> "Tree":
        """parents: a sequence or 1-D integer tensor/array of T >= 1 entries."""
        if isinstance(parents, torch.Tensor):
            if parents.is_floating_point() or parents.dim() != 1:
                raise TypeError(f"parents must be a 1-D integer tensor; got {parents.dtype} of shape "
                                f"{tuple(parents.shape)}")
            arr = parents.detach().cpu().numpy().astype(np.int64)
        else:
            arr = np.asarray(parents)
            if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(f"parents must be a 1-D sequence of ints; got {arr.dtype} of shape {arr.shape}")
            arr = arr.astype(np.int64)
        if arr.size == 0:
            raise ValueError("parents must have at least one node (the root)")
        code, node = _build.check_parents(arr)
        if code != _build.OK:
            raise ValueError(_message(code, int(node), arr))
        mask, depth, first_child, next_sibling = _build.build(arr)
        paths = _build.build_paths(arr, depth, first_child)
        return cls(torch.from_numpy(arr.astype(np.int32)), torch.from_numpy(mask.view(np.int32)),
                   torch.from_numpy(depth), torch.from_numpy(paths), torch.from_numpy(first_child),
                   torch.from_numpy(next_sibling))


def _message(code: int, node: int, parents) -> str:
    p = int(parents[node])
    if code == _build.NOT_ROOT:
        return f"node 0 must be the root with parents[0] = -1; got parents[0] = {p}"
    if code == _build.SECOND_ROOT:
        return f"node {node} is a second root (parents[{node}] = -1); only node 0 may be the root"
    if code == _build.OUT_OF_RANGE:
        return f"node {node} has parent {p}, which is not a node index in [0, {len(parents)})"
    if code == _build.CYCLE:
        return f"node {node} is on a cycle (parents[{node}] = {p} leads back to node {node})"
    return f"node {node}'s parent {p} is not an earlier node (every parent must precede its children)"

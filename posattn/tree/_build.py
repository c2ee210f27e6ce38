"""Host-side tree builders (numba ``njit(cache=True)``): O(T * W) for T nodes, W = ceil(T/32).

They return error codes instead of raising (numba cannot format the messages);
posattn.tree.tree turns a code into a ValueError naming the node.
"""
from __future__ import annotations

import numba
import numpy as np

OK, NOT_ROOT, SECOND_ROOT, OUT_OF_RANGE, CYCLE, NOT_EARLIER = 0, 1, 2, 3, 4, 5


@numba.njit(cache=True)
def check_parents(parents):
    """(code, node): the first problem found, (OK, -1) when parents describe a tree whose
    node 0 is the root and every other node's parent is an earlier node."""
    T = parents.shape[0]
    if T == 0 or parents[0] != -1:
        return NOT_ROOT, 0
    for i in range(1, T):
        p = parents[i]
        if p == -1:
            return SECOND_ROOT, i
        if p < -1 or p >= T:
            return OUT_OF_RANGE, i
        if p >= i:
            # walk up from i: coming back to i is a cycle; else the parent is merely later
            cur = p
            for _ in range(T):
                if cur == i:
                    return CYCLE, i
                if cur <= 0:
                    break
                cur = parents[cur]
                if cur < 0 or cur >= T:
                    break
            return NOT_EARLIER, i
    return OK, -1


@numba.njit(cache=True)
def build(parents):
    """parents int64 [T] (checked) -> (mask uint32 [T, W], depth int32 [T], first_child,
    next_sibling int32 [T]); siblings are in index order."""
    T = parents.shape[0]
    W = (T + 31) // 32
    mask = np.zeros((T, W), dtype=np.uint32)
    depth = np.zeros(T, dtype=np.int32)
    first_child = np.full(T, -1, dtype=np.int32)
    next_sibling = np.full(T, -1, dtype=np.int32)
    for i in range(T):
        p = parents[i]
        if p >= 0:
            depth[i] = depth[p] + 1
            for w in range(W):
                mask[i, w] = mask[p, w]
        mask[i, i // 32] |= np.uint32(1) << np.uint32(i % 32)
    for i in range(T - 1, 0, -1):
        p = parents[i]
        next_sibling[i] = first_child[p]
        first_child[p] = i
    return mask, depth, first_child, next_sibling


@numba.njit(cache=True)
def build_paths(parents, depth, first_child):
    """Root-to-leaf paths int32 [n_leaves, max_depth + 1], -1 padded, leaves in index order."""
    T = parents.shape[0]
    max_depth = 0
    n_leaves = 0
    for i in range(T):
        if depth[i] > max_depth:
            max_depth = depth[i]
        if first_child[i] == -1:
            n_leaves += 1
    paths = np.full((n_leaves, max_depth + 1), -1, dtype=np.int32)
    r = 0
    for i in range(T):
        if first_child[i] == -1:
            cur = i
            while cur >= 0:
                paths[r, depth[cur]] = cur
                cur = parents[cur]
            r += 1
    return paths

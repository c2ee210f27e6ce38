"""The communication plan of context-parallel anchor attention, from the step's boundaries alone.

Every rank builds the same :class:`RingPlan` from ``cu_seqlens`` / ``cu_rows`` (which describe
the whole step and are equal on every rank), so a block that no query of a shard can see is
skipped on both ends of the wire without a message saying so.

``visible[r][s]`` (r != s): some query held by rank r may see some *non-anchor* key held by
rank s. Anchor keys are not part of the ring: the step's anchor tokens are gathered once onto
every rank (``anchor_index``). Shards of two ranks are disjoint token ranges, and a document
that holds tokens of two disjoint ranges covers the gap between them, so at most one document
joins any two of them: visibility is decided in O(log N) per pair of ranges.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from posattn.distributed.sharding import shard_ranges


@dataclass(frozen=True)
class RingPlan:
    world_size: int
    shard: str
    T: int
    ranges: tuple            # ranges[r]: rank r's global token ranges, in local order
    sizes: tuple             # sizes[r]: rank r's local token count
    visible: tuple           # visible[r][s]: rank r's queries see rank s's (non-anchor) keys
    anchor_index: torch.Tensor      # int64 [NA]: global indices of the anchor tokens, ascending
    anchor_local: tuple      # anchor_local[r]: int64 [NA_r] local positions of rank r's anchors
    anchor_from: torch.Tensor       # int64 [NA]: position of anchor a in the rank-ordered concatenation

    def steps(self, rank: int) -> list[tuple[int, int, bool, int, bool]]:
        """(step, peer_out, send, peer_in, recv) per ring step s = 1..W-1 for ``rank``: at step s
        the rank sends its K/V to rank + s (when that rank sees them) and receives rank - s's."""
        W = self.world_size
        out = []
        for s in range(1, W):
            dst, src = (rank + s) % W, (rank - s) % W
            out.append((s, dst, self.visible[dst][rank], src, self.visible[rank][src]))
        return out

    def blocks(self, rank: int) -> int:
        """Ring blocks rank computes (its own included), of world_size."""
        return 1 + sum(self.visible[rank][s] for s in range(self.world_size) if s != rank)


def _seg(b: list[int], t: int) -> int:
    """Start of the (non-empty) segment of boundaries ``b`` holding token t."""
    return b[bisect.bisect_right(b, t) - 1]


def _seg_end(b: list[int], t: int) -> int:
    return b[bisect.bisect_right(b, t)]


def _visible(q: tuple[int, int], k: tuple[int, int], cs, cr, na, causal, window) -> bool:
    """Does some query in [a, b) see a non-anchor key in [c, d)? (disjoint ranges)"""
    (a, b), (c, d) = q, k
    if a >= b or c >= d:
        return False
    if d <= a:                                     # keys before the queries: the document of token a
        ds, de = _seg(cs, a), _seg_end(cs, a)
        if ds > d - 1:
            return False
        k_lo = max(c, ds, _seg(cr, ds) + na)
        if k_lo >= d:
            return False
        return window is None or a - (d - 1) < window
    if causal:                                     # keys after the queries
        return False
    ds, de = _seg(cs, c), _seg_end(cs, c)
    if ds > b - 1:
        return False
    k_lo, k_hi = max(c, _seg(cr, ds) + na), min(d, de)
    if k_lo >= k_hi:
        return False
    return window is None or k_lo - (b - 1) < window


def _sees(qrs, krs, cs, cr, na, causal, window) -> bool:
    """Does some query in the ranges qrs see a non-anchor key in the ranges krs? (ascending,
    disjoint). A query range can only see keys inside the documents it touches, so only the
    key ranges overlapping [doc start of its first token, doc end of its last) are tried:
    O(log) per range plus the few candidates (zigzag_doc holds two ranges per document)."""
    ends = [d for _, d in krs]
    for a, b in qrs:
        if a >= b:
            continue
        lo, hi = _seg(cs, a), (a if causal else _seg_end(cs, b - 1))
        i = bisect.bisect_right(ends, lo)
        while i < len(krs) and krs[i][0] < hi:
            if _visible((a, b), krs[i], cs, cr, na, causal, window):
                return True
            i += 1
    return False


def plan_ring(cu_seqlens, cu_rows, num_anchors: int, causal: bool, window: int | None, world_size: int,
              shard: str = "zigzag") -> RingPlan:
    """The plan for one step (``cu_seqlens`` / ``cu_rows``: int [N+1] / [R+1], or lists); ``shard``
    one of posattn.distributed.sharding.SHARDS."""
    cs = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    cr = cu_rows.tolist() if isinstance(cu_rows, torch.Tensor) else list(cu_rows)
    T = cs[-1]
    W = world_size
    ranges = tuple(tuple(shard_ranges(T, W, r, shard, cu_seqlens=cs)) for r in range(W))
    sizes = tuple(sum(e - s for s, e in rg) for rg in ranges)
    vis = tuple(tuple(r == s or _sees(ranges[r], ranges[s], cs, cr, num_anchors, causal, window)
                      for s in range(W)) for r in range(W))
    anchors = []
    if num_anchors:
        for r0, r1 in zip(cr[:-1], cr[1:]):
            anchors.extend(range(r0, min(r1, r0 + num_anchors)))
    anchor_local, concat = [], []
    for r in range(W):
        loc, off = [], 0
        for s, e in ranges[r]:
            lo, hi = bisect.bisect_left(anchors, s), bisect.bisect_left(anchors, e)
            loc.extend(t - s + off for t in anchors[lo:hi])
            concat.extend(anchors[lo:hi])
            off += e - s
        anchor_local.append(torch.tensor(loc, dtype=torch.int64))
    # anchor_from[a]: where the a-th anchor (ascending) sits in the rank-ordered concatenation
    order = sorted(range(len(concat)), key=concat.__getitem__)
    return RingPlan(W, shard, T, ranges, sizes, vis, torch.tensor(anchors, dtype=torch.int64),
                    tuple(anchor_local), torch.tensor(order, dtype=torch.int64))

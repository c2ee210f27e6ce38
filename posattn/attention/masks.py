"""Structured attention masks and their lowering to per-block visit lists.

A :class:`MaskSpec` says *what* a query may see, independent of the data:

    allowed(i, j) = (doc(i) == doc(j) and order(i, j) and in_window(i, j))
                    or (row(i) == row(j) and j < row_start(i) + num_anchors and order(i, j))
    order(i, j)     = j <= i when causal, else True
    in_window(i, j) = i - j < window (causal), |i - j| < window (non-causal), True without a window

Documents come from ``cu_seqlens`` and rows from ``cu_rows`` (int32 boundary
tensors, as flash-attn's varlen functions take them). The first
``num_anchors`` tokens of each row are its anchors: every query of the row may
see them (AnchorAttention); ``num_anchors=0`` is plain document-masked
(varlen) attention.

:func:`lower` turns a spec and the boundaries into :class:`BlockLists`: for
each query block, the key blocks it visits (CSR) and whether each visited
block needs an element mask; and the transpose (for each key block, the query
blocks that visit it) for the backward. Lists are built with torch ops on the
boundaries' device in O(visited blocks) -- the mask is never evaluated at
every (q, k) point; key blocks that no query of a block may see are not listed,
so they are never loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSpec:
    """What a query may attend to (hashable; the boundaries are data, not part of the spec).

    Args:
        causal: keys after the query are hidden.
        num_anchors: size of each row's anchor prefix, visible to every query of the row (0: none).
        window: keys further than ``window - 1`` positions from the query are hidden
            (anchors excepted); None: no window.
    """

    causal: bool = True
    num_anchors: int = 1
    window: int | None = None

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")
        if isinstance(self.num_anchors, bool) or not isinstance(self.num_anchors, int):
            raise TypeError(f"num_anchors must be an int, got {type(self.num_anchors).__name__}")
        if self.num_anchors < 0:
            raise ValueError(f"num_anchors must be >= 0, got {self.num_anchors}")
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int):
                raise TypeError(f"window must be an int or None, got {type(self.window).__name__}")
            if self.window < 1:
                raise ValueError(f"window must be >= 1 (the query itself is always in its window), "
                                 f"got {self.window}")

    def dense(self, T: int, cu_seqlens: torch.Tensor, cu_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The explicit boolean mask [T, T] (for tests and small T only)."""
        from posattn.kernels.reference.attention import build_mask

        return build_mask(T, cu_seqlens, cu_rows, self.num_anchors, self.causal, self.window)


@dataclass(frozen=True, eq=False)
class BlockLists:
    """A mask lowered for query blocks of ``block_m`` and key blocks of ``block_n`` tokens.

    Token metadata (int32 [T]): ``doc_start`` (first token of the token's document),
    ``row_start`` (first token of its row). Query-major CSR: ``q_offsets`` [NQB+1],
    ``q_kv_idx`` / ``q_kv_masked`` [nnz]; key-major CSR (the transpose): ``k_offsets``
    [NKB+1], ``k_q_idx`` / ``k_q_masked`` [nnz]. ``*_masked`` is int32 1 where the
    block needs the element mask, 0 where every (q, k) pair in it is allowed (such a block
    also lies wholly inside the T tokens). Within each list the unmasked blocks come first,
    ``q_nfull`` [NQB] / ``k_nfull`` [NKB] of them, each group in ascending order, so that a
    kernel runs a mask-free loop and then a masked one. ``nnz``: the entries of each list;
    ``max_per_q``: the longest query block's list (-1 when rebuilt from tensors without a sync).
    """

    block_m: int
    block_n: int
    doc_start: torch.Tensor
    row_start: torch.Tensor
    q_offsets: torch.Tensor
    q_nfull: torch.Tensor
    q_kv_idx: torch.Tensor
    q_kv_masked: torch.Tensor
    k_offsets: torch.Tensor | None
    k_nfull: torch.Tensor | None
    k_q_idx: torch.Tensor | None
    k_q_masked: torch.Tensor | None
    nnz: int
    max_per_q: int


def token_starts(boundaries: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [T]: for each token, the first token of the segment of ``boundaries`` holding it."""
    tok = torch.arange(T, device=boundaries.device, dtype=torch.int32)
    b = boundaries.to(torch.int32)
    # the segment holding t is the last boundary <= t (empty segments are skipped by right=True)
    seg = torch.searchsorted(b, tok, right=True) - 1
    return b[seg]


def _cdiv(a, b):
    return (a + b - 1) // b


# the kernels index the lists with int32 offsets
MAX_LIST_ENTRIES = 2 ** 31 - 1


def _segment_sums(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int64 [len(offsets) - 1]: sums of x over the CSR segments [offsets[i], offsets[i+1])."""
    cs = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    cs[1:] = torch.cumsum(x, 0)
    return cs[offsets[1:]] - cs[offsets[:-1]]


def lower(spec: MaskSpec, cu_seqlens: torch.Tensor, cu_rows: torch.Tensor, T: int, block_m: int,
          block_n: int, transpose: bool = True) -> BlockLists:
    """Block visit lists for ``spec`` over T packed tokens (boundaries already validated).

    Per query block [m0, m1) the visited keys are two ranges:
      document range  [lo, hi): lo = doc_start[m0] (raised to m0 - window + 1 with a window),
                      hi = m1 when causal, else the end of the last query's document
                      (and of its row's anchors; lowered to m1 - 1 + window with a window);
      anchor range    [row_start[m0], row_start[m0] + num_anchors) (cut at m1 when causal),
                      the part of it that lies before the document range.
    Later rows and documents that start inside the block lie inside the document range.
    A block is unmasked when all its queries share one document (or row, for anchor
    blocks) that holds the whole key block, and causality and the window hold at its corners.
    """
    dev = cu_seqlens.device
    i32 = torch.int32
    if T == 0:
        z = torch.zeros(1, dtype=i32, device=dev)
        e = torch.zeros(0, dtype=i32, device=dev)
        return BlockLists(block_m, block_n, e, e, z, e, e, e, z if transpose else None, e if transpose else None,
                          e if transpose else None, e if transpose else None, 0, 0)
    doc_start = token_starts(cu_seqlens, T)
    row_start = token_starts(cu_rows, T)
    cu64 = cu_seqlens.to(torch.int64)
    doc_end = cu64[torch.searchsorted(cu64, doc_start.to(torch.int64), right=True)]  # [T] end of own doc
    nqb = _cdiv(T, block_m)
    nkb = _cdiv(T, block_n)
    na = spec.num_anchors
    W = spec.window

    qb = torch.arange(nqb, device=dev, dtype=torch.int64)
    m0 = qb * block_m
    m1 = torch.clamp(m0 + block_m, max=T)                 # exclusive, clipped
    ds0 = doc_start[m0].to(torch.int64)
    de0 = doc_end[m0]
    ds1 = doc_start[m1 - 1].to(torch.int64)
    de1 = doc_end[m1 - 1]
    rs0 = row_start[m0].to(torch.int64)
    rs1 = row_start[m1 - 1].to(torch.int64)

    lo = ds0 if W is None else torch.maximum(ds0, m0 - W + 1)
    if spec.causal:
        hi = m1.clone()
    else:
        hi = de1 if W is None else torch.minimum(de1, m1 - 1 + W)
        if na:
            hi = torch.maximum(hi, torch.clamp(rs1 + na, max=T))
    db_lo = lo // block_n
    db_hi = _cdiv(hi, block_n)
    if na:
        a_hi = rs0 + na
        if spec.causal:
            a_hi = torch.minimum(a_hi, m1)
        ab_lo = rs0 // block_n
        ab_hi = torch.minimum(_cdiv(a_hi, block_n), db_lo)
        n_anchor = torch.clamp(ab_hi - ab_lo, min=0)
    else:
        ab_lo = torch.zeros_like(qb)
        n_anchor = torch.zeros_like(qb)
    n_doc = db_hi - db_lo
    counts = n_anchor + n_doc
    q_offsets = torch.zeros(nqb + 1, device=dev, dtype=torch.int64)
    q_offsets[1:] = torch.cumsum(counts, 0)
    stats = torch.stack((q_offsets[-1], counts.max())).tolist()   # the one host sync of the lowering
    nnz, max_per_q = int(stats[0]), int(stats[1])
    if nnz > MAX_LIST_ENTRIES:
        raise ValueError(f"the mask lowers to {nnz} (query block, key block) visits, more than the int32 offsets "
                         f"of the block lists hold ({MAX_LIST_ENTRIES}); use larger blocks (block_m={block_m}, "
                         f"block_n={block_n}) or split the batch")

    e_qb = torch.repeat_interleave(qb, counts, output_size=nnz)
    local = torch.arange(nnz, device=dev, dtype=torch.int64) - q_offsets[e_qb]
    na_e = n_anchor[e_qb]
    kb = torch.where(local < na_e, ab_lo[e_qb] + local, db_lo[e_qb] + local - na_e)

    # does the block need the element mask? (a query block cut by the end of the tokens always does)
    n0 = kb * block_n
    n1 = n0 + block_n                                   # unclipped: a key block past T is never full
    em0, em1 = m0[e_qb], m1[e_qb]
    n1c = torch.clamp(n1, max=T)
    single_doc = (ds0[e_qb] == ds1[e_qb]) & (em0 + block_m <= T)
    full_doc = single_doc & (doc_start[torch.clamp(n0, max=T - 1)].to(torch.int64) == ds0[e_qb]) \
        & (n1 <= de0[e_qb]) & (n0 < T)
    if spec.causal:
        full_doc &= n1 - 1 <= em0
    if W is not None:
        full_doc &= (em1 - 1) - n0 < W
        if not spec.causal:
            full_doc &= (n1c - 1) - em0 < W
    full = full_doc
    if na:
        rs = rs0[e_qb]
        full_anchor = (rs == rs1[e_qb]) & (n0 >= rs) & (n1 <= rs + na) & (em0 + block_m <= T)
        if spec.causal:
            full_anchor &= n1 - 1 <= em0
        full = full | full_anchor
    masked = (~full).to(torch.int64)
    # unmasked blocks first within each query block (a stable sort keeps each group ascending)
    order = torch.argsort(e_qb * 2 + masked, stable=True)
    q_kv_idx = kb[order].to(i32)
    q_kv_masked = masked[order].to(i32)
    # counts by differences of prefix sums at the CSR offsets: deterministic on every device
    # (torch.bincount with weights is not on CUDA, and raises under deterministic algorithms)
    q_nfull = (counts - _segment_sums(masked, q_offsets)).to(i32)

    k_offsets = k_q_idx = k_q_masked = k_nfull = None
    if transpose:
        korder = torch.argsort(kb * 2 + masked, stable=True)
        k_q_idx = e_qb[korder].to(i32)
        k_q_masked = masked[korder].to(i32)
        # the sorted key-block ids give the key-major offsets by binary search (no atomics)
        k_offsets = torch.searchsorted(kb[korder], torch.arange(nkb + 1, device=dev, dtype=torch.int64))
        kcounts = k_offsets[1:] - k_offsets[:-1]
        k_nfull = (kcounts - _segment_sums(masked[korder], k_offsets)).to(i32)
        k_offsets = k_offsets.to(i32)
    return BlockLists(block_m, block_n, doc_start.contiguous(), row_start.contiguous(),
                      q_offsets.to(i32), q_nfull, q_kv_idx, q_kv_masked, k_offsets, k_nfull, k_q_idx, k_q_masked,
                      nnz, max_per_q)


def dense_from_lists(lists: BlockLists, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visited, masked) bool [T, T] expanded from the lists: for tests of the lowering."""
    visited = torch.zeros(T, T, dtype=torch.bool)
    masked = torch.zeros(T, T, dtype=torch.bool)
    off = lists.q_offsets.cpu().tolist()
    idx = lists.q_kv_idx.cpu().tolist()
    msk = lists.q_kv_masked.cpu().tolist()
    bm, bn = lists.block_m, lists.block_n
    for qb in range(len(off) - 1):
        for e in range(off[qb], off[qb + 1]):
            sl = (slice(qb * bm, min(qb * bm + bm, T)), slice(idx[e] * bn, min(idx[e] * bn + bn, T)))
            visited[sl] = True
            if msk[e]:
                masked[sl] = True
    return visited, masked


def step_tokens(cu_seqlens: torch.Tensor, cu_rows: torch.Tensor, T: int):
    """(doc_start int32 [T], row_start int32 [T], doc_end int64 [T]) of the step's tokens: what
    :func:`lower_rect` and the rectangle kernels read at global token indices."""
    doc_start = token_starts(cu_seqlens, T)
    row_start = token_starts(cu_rows, T)
    cu64 = cu_seqlens.to(torch.int64)
    doc_end = cu64[torch.searchsorted(cu64, doc_start.to(torch.int64), right=True)]
    return doc_start.contiguous(), row_start.contiguous(), doc_end


def lower_rect(spec: MaskSpec, tokens, q_index: torch.Tensor, k_index: torch.Tensor, block_m: int, block_n: int,
               hide_anchor_keys: bool, transpose: bool = True) -> BlockLists:
    """Block visit lists of a rectangle of the step: Tq queries at the global tokens ``q_index``
    against Tk keys at ``k_index`` (int64, each ascending; e.g. a rank's shard against another's,
    or against the step's anchor tokens). ``tokens``: :func:`step_tokens` of the step.
    ``hide_anchor_keys``: keys that are anchors of their own row are hidden (so their anchor range
    is not listed). Blocks are over local rows (query block b holds q_index[b*block_m : ...]).

    Per query block with first / last query g0 / g1 (global), the keys visited are the local keys
    whose global index falls in the ranges :func:`lower` gives a block [g0, g1] -- a superset when
    the block spans a gap of q_index, as the mask then admits nothing in between that the ranges
    leave out -- mapped to local key ranges by binary search in k_index. Every listed block
    is marked masked (the kernel tests each pair): the rectangle's blocks are few, the element
    test is cheap beside the products, and no full-block shortcut has to be proven for gaps.
    """
    doc_start, row_start, doc_end = tokens
    dev = q_index.device
    i32, i64 = torch.int32, torch.int64
    Tq, Tk, T = q_index.shape[0], k_index.shape[0], doc_start.shape[0]
    nqb, nkb = _cdiv(Tq, block_m), _cdiv(Tk, block_n)
    e = torch.zeros(0, dtype=i32, device=dev)
    if Tq == 0 or Tk == 0:
        zk = torch.zeros(nkb + 1, dtype=i32, device=dev)
        return BlockLists(block_m, block_n, doc_start, row_start, torch.zeros(nqb + 1, dtype=i32, device=dev),
                          torch.zeros(nqb, dtype=i32, device=dev), e, e, zk if transpose else None,
                          torch.zeros(nkb, dtype=i32, device=dev) if transpose else None,
                          e if transpose else None, e if transpose else None, 0, 0)
    qi, ki = q_index.to(i64), k_index.to(i64).contiguous()
    na, W = spec.num_anchors, spec.window
    qb = torch.arange(nqb, device=dev, dtype=i64)
    g0 = qi[qb * block_m]
    g1 = qi[torch.clamp(qb * block_m + block_m, max=Tq) - 1]
    ds0 = doc_start[g0].to(i64)
    lo = ds0 if W is None else torch.maximum(ds0, g0 - W + 1)
    if spec.causal:
        hi = g1 + 1
    else:
        hi = doc_end[g1] if W is None else torch.minimum(doc_end[g1], g1 + W)
        if na and not hide_anchor_keys:
            hi = torch.maximum(hi, torch.clamp(row_start[g1].to(i64) + na, max=T))
    kl, kh = torch.searchsorted(ki, lo), torch.searchsorted(ki, hi)
    has_doc = kh > kl
    db_lo = torch.where(has_doc, kl // block_n, torch.full_like(kl, nkb))
    n_doc = torch.where(has_doc, _cdiv(kh, block_n) - kl // block_n, torch.zeros_like(kl))
    if na and not hide_anchor_keys:
        rs0 = row_start[g0].to(i64)
        a_hi = rs0 + na if not spec.causal else torch.minimum(rs0 + na, g1 + 1)
        al, ah = torch.searchsorted(ki, rs0), torch.searchsorted(ki, a_hi)
        ab_lo = al // block_n
        n_anchor = torch.where(ah > al, torch.clamp(torch.minimum(_cdiv(ah, block_n), db_lo) - ab_lo, min=0),
                               torch.zeros_like(al))
    else:
        ab_lo = torch.zeros_like(qb)
        n_anchor = torch.zeros_like(qb)
    counts = n_anchor + n_doc
    q_offsets = torch.zeros(nqb + 1, device=dev, dtype=i64)
    q_offsets[1:] = torch.cumsum(counts, 0)
    nnz, max_per_q = (int(x) for x in torch.stack((q_offsets[-1], counts.max())).tolist())   # the one host sync
    e_qb = torch.repeat_interleave(qb, counts, output_size=nnz)
    local = torch.arange(nnz, device=dev, dtype=i64) - q_offsets[e_qb]
    na_e = n_anchor[e_qb]
    kb = torch.where(local < na_e, ab_lo[e_qb] + local, db_lo[e_qb] + local - na_e)
    ones = torch.ones(nnz, dtype=i32, device=dev)
    k_offsets = k_q_idx = k_q_masked = k_nfull = None
    if transpose:
        korder = torch.argsort(kb, stable=True)
        k_q_idx = e_qb[korder].to(i32)
        k_q_masked = ones
        k_offsets = torch.searchsorted(kb[korder], torch.arange(nkb + 1, device=dev, dtype=i64)).to(i32)
        k_nfull = torch.zeros(nkb, dtype=i32, device=dev)
    return BlockLists(block_m, block_n, doc_start, row_start, q_offsets.to(i32),
                      torch.zeros(nqb, dtype=i32, device=dev), kb.to(i32), ones, k_offsets, k_nfull, k_q_idx, k_q_masked, nnz, max_per_q)

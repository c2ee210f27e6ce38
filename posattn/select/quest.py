"""Quest (Tang et al., 2024): per-page min/max key summaries, page upper bounds, pages -> tokens.

A summary holds, per physical page (or, for a contiguous cache [B, S, Hk, D], per request and page
of ``page_size`` slots: page ``b * (S // page_size) + p``) and KV head, the elementwise min and max
of the page's *valid* keys, in the cache's dtype (exact). ``page_scores`` bounds q . k over a page
by ``sum_d max(q_d min_d, q_d max_d)``; the top pages expand to token indices for
``decode_attention(kv_indices=)``. Nothing here reads a tensor value on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.decode.checks import MAX_HEAD_DIM, _int32
from posattn.lowered import token_bucket


class PageSummary(NamedTuple):
    """kmin, kmax: [num_pages, Hk, D] in the cache's dtype; page_size: the slots per page."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    page_size: int


@dataclass(frozen=True)
class PageScoresKey:
    device_type: str
    dtype: str
    head_dim: int
    heads_q: int
    heads_k: int
    pages_bucket: int
    batch_bucket: int


def _layout(k_cache, cache_seqlens, block_table, page_size):
    """(pages view [num_pages, PS, Hk, D], page_ids int32 [B, max_pages], PS) of either cache layout."""
    V.float_tensor(k_cache, "k_cache")
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be 4-D: [num_blocks, page_size, Hk, D] with block_table, "
                         f"[B, S_cap, Hk, D] without; got shape {tuple(k_cache.shape)}")
    _int32(cache_seqlens, "cache_seqlens", k_cache.device, 1, "[B] (tokens cached per request)")
    B = cache_seqlens.shape[0]
    if block_table is not None:
        _int32(block_table, "block_table", k_cache.device, 2, "[B, max_blocks] of page indices")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must be [{B}, max_blocks]; got {list(block_table.shape)}")
        ps = k_cache.shape[1]
        if page_size is not None and page_size != ps:
            raise ValueError(f"page_size ({page_size}) must be the paged cache's page size ({ps})")
        return k_cache, block_table, ps
    if page_size is None or isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int for a contiguous cache; got {page_size!r}")
    if k_cache.shape[0] != B:
        raise ValueError(f"a contiguous k_cache must be [B={B}, S_cap, Hk, D]; got {tuple(k_cache.shape)}")
    S = k_cache.shape[1]
    if S % page_size:
        raise ValueError(f"a contiguous cache's length ({S}) must be a multiple of page_size ({page_size})")
    P = S // page_size
    pages = k_cache.reshape(B * P, page_size, *k_cache.shape[2:])
    ids = torch.arange(B * P, dtype=torch.int32, device=k_cache.device).view(B, P)
    return pages, ids, page_size


def _masked_minmax(rows, nvalid):
    """rows [n, PS, Hk, D], nvalid int64 [n] -> (min, max) [n, Hk, D] over the first nvalid rows."""
    ok = (torch.arange(rows.shape[1], device=rows.device)[None, :] < nvalid[:, None])[:, :, None, None]
    inf = torch.tensor(float("inf"), dtype=rows.dtype, device=rows.device)
    return torch.where(ok, rows, inf).amin(1), torch.where(ok, rows, -inf).amax(1)


def page_summary(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, *, block_table: torch.Tensor | None = None,
                 page_size: int | None = None) -> PageSummary:
    """Quest's page summary of a cache.

    Args:
        k_cache: [num_blocks, page_size, Hk, D] with ``block_table`` int32 [B, max_blocks], or a
            contiguous [B, S_cap, Hk, D] (then ``page_size`` is required and divides S_cap).
        cache_seqlens: int32 [B], tokens cached per request.
    Returns:
        PageSummary(kmin, kmax [num_pages, Hk, D], page_size): each page's min/max over its valid
        rows (the last page of a request: its first ``L - p * page_size`` rows). Pages no request
        covers hold the min/max of all their rows.
    """
    pages, ids, ps = _layout(k_cache, cache_seqlens, block_table, page_size)
    NP = pages.shape[0]
    # every page over all its rows (one read of the cache), then each request's partial last page
    kmin = torch.empty((NP + 1,) + tuple(pages.shape[2:]), dtype=pages.dtype, device=pages.device)
    kmax = torch.empty_like(kmin)
    if NP:
        kmin[:NP] = pages.amin(1)
        kmax[:NP] = pages.amax(1)
    L = cache_seqlens.to(torch.int64)
    B = L.shape[0]
    if B and ids.shape[1] and NP:
        last = ((L - 1).clamp(min=0) // ps).clamp(max=ids.shape[1] - 1)                  # [B]
        page = torch.gather(ids.to(torch.int64), 1, last[:, None])[:, 0].clamp(0, max(NP - 1, 0))
        page = torch.where(L > 0, page, torch.full_like(page, NP))                       # empty: the spare row
        nvalid = (L - last * ps).clamp(0, ps)
        mn, mx = _masked_minmax(pages[page.clamp(max=max(NP - 1, 0))], nvalid)
        kmin.index_fill_(0, page, float("inf"))
        kmax.index_fill_(0, page, -float("inf"))
        at = page[:, None, None].expand_as(mn)    # requests sharing a page: the union of their rows
        kmin.scatter_reduce_(0, at, mn, "amin")
        kmax.scatter_reduce_(0, at, mx, "amax")
    return PageSummary(kmin[:NP], kmax[:NP], ps)


def _check_summary(summary, ps, pages) -> None:
    if not isinstance(summary, PageSummary):
        raise TypeError(f"summary must be a posattn.select.PageSummary, got {type(summary).__name__}")
    if summary.page_size != ps:
        raise ValueError(f"summary was built for page_size {summary.page_size}, but the cache's pages hold {ps} slots")
    want = (pages.shape[0],) + tuple(pages.shape[2:])
    if tuple(summary.kmin.shape) != want or tuple(summary.kmax.shape) != want:
        raise ValueError(f"summary.kmin/kmax must be {list(want)} for this cache; got {list(summary.kmin.shape)}")
    if summary.kmin.dtype != pages.dtype or summary.kmin.device != pages.device:
        raise ValueError(f"summary must be {pages.dtype} on {pages.device} like k_cache; got "
                         f"{summary.kmin.dtype} on {summary.kmin.device}")


def check_summary_for(summary, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                      block_table: torch.Tensor | None = None) -> None:
    """Raise (TypeError / ValueError naming what differs) unless ``summary`` fits this cache."""
    pages, _, ps = _layout(k_cache, cache_seqlens, block_table, getattr(summary, "page_size", None)
                           if block_table is None else None)
    _check_summary(summary, ps, pages)


def update_page_summary(summary: PageSummary, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, num_new: int = 1,
                        *, block_table: torch.Tensor | None = None) -> PageSummary:
    """Bring ``summary`` up to date (in place) after ``num_new`` keys per request were written at
    slots ``cache_seqlens[b] + i`` (the decode engine's convention: lengths before the append).
    Each touched page is recomputed from its valid rows (so a reused page carries nothing stale):
    O(B * pages touched * page_size) work. Returns ``summary``."""
    pages, ids, ps = _layout(k_cache, cache_seqlens, block_table, getattr(summary, "page_size", None)
                             if block_table is None else None)
    _check_summary(summary, ps, pages)
    if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 1:
        raise ValueError(f"num_new must be a positive int (keys appended per request); got {num_new!r}")
    B, MP = ids.shape
    if B == 0 or MP == 0:
        return summary
    L0 = cache_seqlens.to(torch.int64)
    L1 = L0 + num_new
    first = (L0 // ps).clamp(max=MP - 1)
    last = ((L1 - 1) // ps).clamp(max=MP - 1)
    n_touch = -(-num_new // ps) + 1                                       # a bound on pages per request
    lp = first[:, None] + torch.arange(n_touch, device=L0.device)[None, :]
    lp = torch.minimum(lp, last[:, None])                               # repeats carry identical values
    page = torch.gather(ids.to(torch.int64), 1, lp).clamp(0, pages.shape[0] - 1).reshape(-1)
    nvalid = (L1[:, None] - lp * ps).clamp(0, ps).reshape(-1)
    mn, mx = _masked_minmax(pages[page], nvalid)
    summary.kmin.index_copy_(0, page, mn)
    summary.kmax.index_copy_(0, page, mx)
    return summary


def check_summary_slots(summary, k_cache: torch.Tensor) -> None:
    """Raise unless ``summary`` fits the paged NHD cache view ``k_cache [num_blocks, page_size, Hk, D]``."""
    _check_summary(summary, k_cache.shape[1], k_cache)


def update_page_summary_slots(summary: PageSummary, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> PageSummary:
    """Bring ``summary`` up to date (in place) after keys were written at flat ``slot_mapping``
    (int64 [T], block * page_size + offset, -1 skipped), as rope_and_cache writes them.

    k_cache: the paged NHD view [num_blocks, page_size, Hk, D]. Pages fill in order (the engine's
    appends), so a page written at offsets up to o holds rows 0..o: each touched page is recomputed
    over those rows (a reused page carries nothing stale). No host sync: the skipped tokens are
    pointed at a written token's page (or, when none is written, leave page 0 as it was)."""
    ps, NP = k_cache.shape[1], k_cache.shape[0]
    T = slot_mapping.shape[0]
    if T == 0 or NP == 0:
        return summary
    sl = slot_mapping.to(torch.int64)
    valid = sl >= 0
    first = valid.to(torch.int8).argmax()                     # a written token (0 when there is none)
    sl = torch.where(valid, sl, sl[first]).clamp(min=0)
    page = (sl // ps).clamp(max=NP - 1)
    upto = torch.zeros(NP, dtype=torch.int64, device=sl.device)
    upto.scatter_reduce_(0, page, torch.where(valid, sl % ps + 1, 0), "amax")
    mn, mx = _masked_minmax(k_cache[page], upto[page])
    anyv = valid.any()
    summary.kmin.index_copy_(0, page, torch.where(anyv, mn, summary.kmin[page]))
    summary.kmax.index_copy_(0, page, torch.where(anyv, mx, summary.kmax[page]))
    return summary


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cache_seqlens: torch.Tensor, *,
                page_size: int, block_table: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Quest's per-page upper bound of q . k.

    Args:
        q: [B, Hq, D] (rotated like the cached keys).
        kmin, kmax: [num_pages, Hk, D] (a PageSummary's); page ``block_table[b, p]``, or for a
            contiguous cache ``b * (num_pages // B) + p``.
        cache_seqlens: int32 [B]; page_size: the summary's page size.
    Returns:
        fp32 [B, Hq, max_pages]: ``sum_d max(q_d kmin_d, q_d kmax_d)``, -inf for pages past the length.
    """
    V.float_tensor(q, "q")
    V.float_tensor(kmin, "kmin")
    V.float_tensor(kmax, "kmax")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] (one query per request); got shape {tuple(q.shape)}")
    B, HQ, D = q.shape
    if kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"kmin and kmax must be [num_pages, Hk, D] of one shape; got {tuple(kmin.shape)}, "
                         f"{tuple(kmax.shape)}")
    V.same_device(q, "q", kmin=kmin, kmax=kmax)
    if kmin.dtype != kmax.dtype:
        raise TypeError(f"kmin and kmax must share a dtype; got {kmin.dtype}, {kmax.dtype}")
    NP, HK = kmin.shape[:2]
    if kmin.shape[2] != D:
        raise ValueError(f"kmin's head_dim ({kmin.shape[2]}) must equal q's ({D})")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}; got {D}")
    if HK == 0 or HQ % HK:
        raise ValueError(f"q's head count ({HQ}) must be a multiple of kmin's ({HK}) (GQA)")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int; got {page_size!r}")
    _int32(cache_seqlens, "cache_seqlens", q.device, 1, "[B] (tokens cached per request)")
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [{B}] (q's batch); got {list(cache_seqlens.shape)}")
    if block_table is None:
        if B == 0 or NP % B:
            raise ValueError(f"without block_table, kmin's pages ({NP}) must be B ({B}) x pages per request")
        ids = torch.arange(NP, dtype=torch.int32, device=q.device).view(B, NP // B)
    else:
        _int32(block_table, "block_table", q.device, 2, "[B, max_blocks] of page indices")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must be [{B}, max_blocks]; got {list(block_table.shape)}")
        ids = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    key = PageScoresKey(q.device.type, str(kmin.dtype).removeprefix("torch."), D, HQ, HK, token_bucket(ids.shape[1]),
                        token_bucket(B))
    kernel, config = dispatch.select("page_scores", key, backend=backend, device_index=q.device.index)
    wide = torch.float64 if kernel.backend == "reference" else torch.float32
    return kernel.fn(q.to(wide).contiguous(), kmin.contiguous(), kmax.contiguous(), ids, cache_seqlens, page_size,
                     config)


def expand_pages(pages: torch.Tensor, page_size: int, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """Chosen logical pages -> token indices for decode_attention(kv_indices=).

    pages: int32 [B, H, n] (-1 pads); cache_seqlens: int32 [B] -> int32 [B, H, n * page_size]:
    page p's slots p * page_size + r, -1 for pads and slots past the request's length."""
    V.int_tensor(pages, "pages")
    if pages.dim() != 3:
        raise ValueError(f"pages must be [B, H, n]; got shape {tuple(pages.shape)}")
    r = torch.arange(page_size, device=pages.device, dtype=torch.int64)
    p = pages.to(torch.int64)[..., None]
    tok = p * page_size + r                                                    # [B, H, n, PS]
    L = cache_seqlens.to(torch.int64)[:, None, None, None]
    ok = (p >= 0) & (tok < L)
    return torch.where(ok, tok, -1).to(torch.int32).flatten(-2)

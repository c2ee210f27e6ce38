"""Selection policies for sparse decode: Quest, TidalDecode, TokenSelect, and TokenSelect's selection cache.

A policy turns one decode step of one layer into the ``kv_indices`` of the decode engine:
``policy.select(layer, q [B, Hq, D], k_cache [B, S, Hk, D] (post-RoPE keys, any strides with a
contiguous last dim), cache_seqlens int32 [B], scale)`` -> int32 [B, Hk or Hq, budget] of cached
slots (-1 pads), or None for "attend to everything" (a dense layer). The step's new token is always
attended by the engine, on top of the list. Every choice stays on the device (no host sync).
"""
from __future__ import annotations

import torch

from posattn.select.quest import expand_pages, page_scores, page_summary
from posattn.select.scores import scores
from posattn.select.topk import MAX_K, topk


def _budget(budget, sinks, window):
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (tokens per head); got {budget!r}")
    if budget > MAX_K:
        raise ValueError(f"budget must be at most {MAX_K} (the largest top-k supported); got {budget}")
    for name, v in (("sinks", sinks), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int; got {v!r}")
    if sinks + window > budget:
        raise ValueError(f"sinks + window ({sinks} + {window}) must be at most budget ({budget})")


def _per_kv_head(idx, HK):
    """[B, 1, k] -> [B, Hk, k] (one list shared by all heads)."""
    return idx.expand(idx.shape[0], HK, idx.shape[2]).contiguous()


class SelectionCache:
    """TokenSelect's selection cache: a request reuses the previous step's indices when the cosine
    similarity of its consecutive queries (mean over heads) is at least ``threshold``.

    One step: ``lengths = cache.plan(q [B, Hq, D], cache_seqlens [B])`` decides which requests
    reuse and returns int32 [B] lengths to score with: 0 for those (so ``scores`` and ``topk`` do
    no work for them: no K row is read, the row is -inf / -1), ``cache_seqlens`` for the others;
    then ``cache.choose(q, fresh [B, H, k], cache_seqlens)`` -> [B, H, k] takes the reused list or
    the fresh one. Both are torch ops on q's device (no host sync, CUDA-graph safe). ``choose``
    without ``plan`` decides itself (the fresh selection was then computed for every request).
    A reused list (ascending, -1 pads last, as topk writes it) gets the tokens cached since it was
    chosen in its padding slots, so a budget that covers the context stays dense; a full list is
    reused as it is. ``reused`` counts, per request, the steps that reused (a device tensor)."""

    def __init__(self, threshold: float):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [-1, 1] (a cosine similarity); got {threshold!r}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self.prev_q = self.prev_idx = self.prev_len = self.reused = None
        self._planned = None

    def _decide(self, q: torch.Tensor):
        """(normalised q, reuse bool [B] or None when there is nothing to reuse)."""
        qn = torch.nn.functional.normalize(q.float(), dim=-1)
        if self.prev_q is None or self.prev_q.shape != qn.shape or self.prev_q.device != qn.device:
            return qn, None
        return qn, (qn * self.prev_q).sum(-1).mean(-1) >= self.threshold                # [B]

    def plan(self, q: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """int32 [B]: the lengths to score this step with (0 where the previous list is reused)."""
        qn, reuse = self._decide(q)
        self._planned = (q, qn, reuse)
        if reuse is None:
            return cache_seqlens
        return torch.where(reuse, torch.zeros_like(cache_seqlens), cache_seqlens)

    def choose(self, q: torch.Tensor, fresh: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        planned = self._planned is not None and self._planned[0] is q
        qn, reuse = self._planned[1:] if planned else self._decide(q)
        self._planned = None
        L = cache_seqlens.to(torch.int64)
        if reuse is None or self.prev_idx.shape != fresh.shape or self.prev_idx.device != fresh.device:
            if reuse is not None and planned:       # plan() skipped the scoring of the requests that reuse
                raise ValueError(f"fresh must be {list(self.prev_idx.shape)} on {self.prev_idx.device} (the previous "
                                 f"step's indices), got {list(fresh.shape)} on {fresh.device}: call reset() between "
                                 "sequences of another shape")
            out = fresh
            self.reused = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        else:
            # the previous list plus the slots cached since, written into its -1 padding
            prev = self.prev_idx
            m = (prev >= 0).sum(-1, keepdim=True)                                # [B, H, 1]
            j = torch.arange(prev.shape[-1], device=prev.device)
            slot = self.prev_len[:, None, None] + (j - m)                        # [B, H, k]
            ext = torch.where((j >= m) & (slot < L[:, None, None]), slot, prev).to(prev.dtype)
            out = torch.where(reuse[:, None, None], ext, fresh)
            self.reused += reuse.to(torch.int64)
        self.prev_q, self.prev_idx, self.prev_len = qn, out, L
        return out


class Quest:
    """Quest (Tang et al., 2024): per query head, the ``budget // page_size`` pages with the highest
    min/max upper bound (page_scores), the request's last page always included."""

    def __init__(self, budget: int, page_size: int = 16):
        _budget(budget, 0, 0)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int; got {page_size!r}")
        if budget < page_size:
            raise ValueError(f"budget ({budget}) must hold at least one page of {page_size} tokens")
        self.budget, self.page_size = budget, page_size

    def reset(self) -> None:
        pass

    def select(self, layer: int, q, k_cache, cache_seqlens, scale):
        B, S = k_cache.shape[:2]
        ps = self.page_size
        P = -(-S // ps)
        kc = k_cache
        if P * ps != S or not kc.is_contiguous():   # page_summary wants [B, P * ps, Hk, D] contiguous
            kc = torch.nn.functional.pad(kc, (0, 0, 0, 0, 0, P * ps - S)).contiguous()
        summ = page_summary(kc, cache_seqlens, page_size=ps)
        ub = page_scores(q, summ.kmin, summ.kmax, cache_seqlens, page_size=ps)     # [B, Hq, P]
        npages = (cache_seqlens.to(torch.int64) + ps - 1) // ps
        pages = topk(ub, self.budget // ps, lengths=npages, window=1)               # [B, Hq, n]
        return expand_pages(pages, ps, cache_seqlens)


class TokenSelect:
    """TokenSelect: TokenSelect's soft vote (each head's softmax over the request's tokens, summed
    over heads) chooses ``budget`` tokens shared by all heads; a :class:`SelectionCache` of
    ``threshold`` reuses the previous step's choice for similar consecutive queries (one cache per layer)."""

    def __init__(self, budget: int, threshold: float = 0.9, *, sinks: int = 0, window: int = 0):
        _budget(budget, sinks, window)
        SelectionCache(threshold)   # checks the threshold
        self.budget, self.threshold, self.sinks, self.window = budget, float(threshold), sinks, window
        self.caches: dict[int, SelectionCache] = {}

    def reset(self) -> None:
        self.caches.clear()

    def select(self, layer: int, q, k_cache, cache_seqlens, scale):
        cache = self.caches.setdefault(layer, SelectionCache(self.threshold))
        L = cache.plan(q, cache_seqlens)                  # 0 for the requests that reuse: no scoring for them
        vote = scores(q, k_cache, L, reduce="soft_vote", softmax_scale=scale)                 # [B, 1, S]
        fresh = topk(vote, self.budget, lengths=L, sinks=self.sinks, window=self.window)
        return _per_kv_head(cache.choose(q, fresh, cache_seqlens), k_cache.shape[2])


class TidalDecode:
    """TidalDecode (Yang et al., 2024): the ``selection_layers`` (and ``reselection_layer``) run full
    attention and choose the ``budget`` tokens with the highest q . k summed over heads; the layers
    after each of them reuse that choice (position persistence); layers before the first run dense."""

    def __init__(self, budget: int, selection_layers=(0, 1, 2), reselection_layer: int | None = None, *,
                 sinks: int = 0, window: int = 0):
        _budget(budget, sinks, window)
        layers = tuple(selection_layers)
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise ValueError(f"selection_layers must be a non-empty sequence of layer indices; got {selection_layers!r}")
        if reselection_layer is not None and (isinstance(reselection_layer, bool)
                                              or not isinstance(reselection_layer, int) or reselection_layer < 0):
            raise ValueError(f"reselection_layer must be a layer index or None; got {reselection_layer!r}")
        self.budget, self.sinks, self.window = budget, sinks, window
        self.selecting = frozenset(layers + ((reselection_layer,) if reselection_layer is not None else ()))
        self.first = min(self.selecting)
        self.current = None

    def reset(self) -> None:
        self.current = None

    def select(self, layer: int, q, k_cache, cache_seqlens, scale):
        if layer < self.first:
            return None
        if layer in self.selecting:
            # summed over all heads: per KV group in the kernel (Hq/Hk times less work), then over groups
            s = scores(q, k_cache, cache_seqlens, reduce="kv_group", softmax_scale=scale).sum(1, keepdim=True)
            self.current = topk(s, self.budget, lengths=cache_seqlens, sinks=self.sinks, window=self.window)
            return None                                    # this layer attends densely
        return _per_kv_head(self.current, k_cache.shape[2])

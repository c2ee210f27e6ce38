"""kv_compact: move each request's accepted tokens to the end of its cached prefix (after
speculative verification, or to realign a ragged batch), in one launch, then advance
cache_seqlens in place. Layouts and value checks as posattn/decode/cache.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posattn import _validate as V
from posattn import _plans, dispatch
from posattn.decode.cache import (_ALL, KV_LAYOUTS, _check_cache_pair, _cpu_supports, _cuda_supports, _dname,
                                  _nhd, _triton_supports, _want_values)
from posattn.kernels import cpu_cache
from posattn.kernels.reference import cache as ref_cache
from posattn.lowered import token_bucket


@dataclass(frozen=True)
class CompactKey:
    """kv_compact's kernel key."""

    device_type: str
    dtype: str
    head_dim: int
    heads_k: int
    paged: bool
    width_bucket: int     # src.shape[1], bucketed


@torch.library.custom_op("posattn::kv_compact", mutates_args=("k_cache", "v_cache", "cache_seqlens"))
def _kv_compact_op(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, src: torch.Tensor,
                   counts: torch.Tensor, block_table: Optional[torch.Tensor], hnd: bool, backend: str) -> None:
    kc, vc = _nhd(k_cache, "HND" if hnd else "NHD"), _nhd(v_cache, "HND" if hnd else "NHD")
    key = _compact_key(kc, src, block_table)
    kernel, config = dispatch.select("kv_compact", key, backend=backend or None,
                                     device_index=k_cache.device.index)
    kernel.fn(kc, vc, cache_seqlens, src, counts, block_table, config)


@_kv_compact_op.register_fake
def _kv_compact_fake(k_cache, v_cache, cache_seqlens, src, counts, block_table, hnd, backend):
    return None


def _compact_key(kc, src, block_table) -> CompactKey:
    return CompactKey(kc.device.type, _dname(kc.dtype), kc.shape[3], kc.shape[2], block_table is not None,
                      token_bucket(src.shape[1]))


def kv_compact(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, src: torch.Tensor,
               counts: torch.Tensor, *, block_table: torch.Tensor | None = None, kv_layout: str = "NHD",
               check: bool | None = None, backend: str | None = None) -> None:
    """Move each request's accepted tokens to the end of its cached prefix, in one launch.

    For request b with L = cache_seqlens[b]: the tokens at logical slots src[b, :counts[b]]
    (strictly ascending, each >= L) move to logical slots L, L + 1, ..., L + counts[b] - 1
    (correct when the ranges overlap), then cache_seqlens[b] += counts[b] in place.

    Args:
        k_cache, v_cache: paged [num_blocks, page_size, Hk, D] with ``block_table`` (int32
            [B, max_blocks]; logical slot l is (block_table[b, l // page_size], l % page_size)),
            or contiguous [B, S_cap, Hk, D] without it ("HND" swaps the page and head axes).
        cache_seqlens: int32 or int64 [B], contiguous; advanced in place.
        src: int32/int64 [B, N] logical slots; only the first counts[b] of row b are read.
        counts: int32/int64 [B], each in [0, N].
        check: value checks (sources ascending and >= cache_seqlens, counts in range, capacity,
            block table entries): None runs them for CPU tensors only (never under
            torch.compile), True always (one sync), False never.
    """
    if k_cache.__class__ is not torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(k_cache, DTensor):
            from posattn.distributed import dtensor_decode   # heads / batch placements run on the local shards

            return dtensor_decode.kv_compact(kv_compact, k_cache, v_cache, cache_seqlens, src, counts,
                                             block_table=block_table, kv_layout=kv_layout, check=check,
                                             backend=backend)
    pk = None
    if not torch.compiler.is_compiling():
        try:
            pk = (_sig(k_cache), _sig(v_cache), _sig(cache_seqlens), _sig(src), _sig(counts), _sig(block_table),
                  kv_layout, check, backend, dispatch.context_backend(), dispatch.env_backend_raw())
            plan = _PLANS.get(pk)
        except (AttributeError, TypeError):   # not tensors, or unhashable: the checks below name them
            plan, pk = None, None
        if plan is not None:
            plan.run(k_cache, v_cache, cache_seqlens, src, counts, block_table)
            return
    if kv_layout not in KV_LAYOUTS:
        V.choice(kv_layout, "kv_layout", KV_LAYOUTS)
    V.float_tensor(k_cache, "k_cache")
    kc, vc = _check_cache_pair(k_cache, v_cache, kv_layout, None, None, None, k_cache.dtype, k_cache.device)
    dev = k_cache.device
    for name, x in (("cache_seqlens", cache_seqlens), ("src", src), ("counts", counts)):
        V.int_tensor(x, name)
    V.same_device(k_cache, "k_cache", cache_seqlens=cache_seqlens, src=src, counts=counts, block_table=block_table)
    if cache_seqlens.dim() != 1 or not cache_seqlens.is_contiguous():
        raise ValueError(f"cache_seqlens must be a contiguous 1-D [B] tensor; got shape {tuple(cache_seqlens.shape)}")
    B = cache_seqlens.shape[0]
    if src.dim() != 2 or src.shape[0] != B:
        raise ValueError(f"src must be [B, N] with B = {B} (cache_seqlens' length); got shape {tuple(src.shape)}")
    if counts.shape != (B,):
        raise ValueError(f"counts must be [B] = [{B}]; got shape {tuple(counts.shape)}")
    if block_table is not None:
        V.tensor(block_table, "block_table")
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32; got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be [B, max_blocks] with B = {B}; got shape {tuple(block_table.shape)}")
        capacity = block_table.shape[1] * kc.shape[1]
    else:
        if kc.shape[0] != B:
            raise ValueError(f"a contiguous cache (block_table=None) must be [B, S_cap, Hk, D] with B = {B}; "
                             f"got {kc.shape[0]} rows in k_cache")
        capacity = kc.shape[1]
    hnd = kv_layout == "HND"
    if torch.compiler.is_compiling():
        if check is True:       # asked for: a host read (a graph break); by default none when compiling
            _check_compact_values(cache_seqlens, src, counts, block_table, capacity, kc.shape[0])
        if block_table is not None:
            block_table = block_table.contiguous()
        _kv_compact_op(k_cache, v_cache, cache_seqlens, src.contiguous(), counts.contiguous(), block_table, hnd,
                       backend or "")
        return
    kernel, config = dispatch.select("kv_compact", _compact_key(kc, src, block_table), backend=backend,
                                     device_index=k_cache.device.index)
    plan = _CompactPlan(kernel.fn, config, hnd, _want_values(check, dev), capacity, kc.shape[0])
    if pk is not None:
        _plans.store(_PLANS, pk, plan, 256)
    plan.run(k_cache, v_cache, cache_seqlens, src, counts, block_table)


def _sig(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


_PLANS: dict = _plans.new_table()


class _CompactPlan:
    """kv_compact for one checked signature: the kernel, its config, and the value checks to run."""

    __slots__ = ("fn", "config", "hnd", "values", "capacity", "num_blocks")

    def __init__(self, fn, config, hnd, values, capacity, num_blocks):
        self.fn, self.config, self.hnd = fn, config, hnd
        self.values, self.capacity, self.num_blocks = values, capacity, num_blocks

    def run(self, k_cache, v_cache, cache_seqlens, src, counts, block_table):
        # the kernels read src rows, counts and block-table rows with unit stride
        src, counts = src.contiguous(), counts.contiguous()
        if block_table is not None:
            block_table = block_table.contiguous()
        if self.values:
            _check_compact_values(cache_seqlens, src, counts, block_table, self.capacity, self.num_blocks)
        kc, vc = (k_cache.transpose(1, 2), v_cache.transpose(1, 2)) if self.hnd else (k_cache, v_cache)
        self.fn(kc, vc, cache_seqlens, src, counts, block_table, self.config)


def _check_compact_values(cache_seqlens, src, counts, block_table, capacity, num_blocks):
    L, S, C = cache_seqlens.tolist(), src.tolist(), counts.tolist()
    for b, (l, row, n) in enumerate(zip(L, S, C)):
        if not 0 <= n <= len(row):
            raise ValueError(f"counts[{b}] = {n} must be in [0, N] = [0, {len(row)}] (src's width)")
        if l < 0 or l + n > capacity:
            raise ValueError(f"cache_seqlens[{b}] + counts[{b}] = {l} + {n} exceeds the request's capacity {capacity}")
        for i in range(n):
            if row[i] < l:
                raise ValueError(f"kv_compact sources must be >= the cached length: src[{b}, {i}] = {row[i]} < "
                                 f"cache_seqlens[{b}] = {l}")
            if i and row[i] <= row[i - 1]:
                raise ValueError(f"kv_compact sources must be strictly ascending: src[{b}, {i}] = {row[i]} <= "
                                 f"src[{b}, {i - 1}] = {row[i - 1]}")
            if row[i] >= capacity:
                raise ValueError(f"src[{b}, {i}] = {row[i]} is beyond the request's capacity {capacity}")
    if block_table is not None and block_table.numel():
        lo, hi = (int(x) for x in torch.aminmax(block_table))
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table entries must be in [0, num_blocks) = [0, {num_blocks}); got "
                             f"{lo if lo < 0 else hi}")



# ---------------------------------------------------------------------------
# kernels

def _triton_compact(*args):
    from posattn.kernels.triton import cache as tc

    return tc.kv_compact_forward(*args)


def _cpu_compact(kc, vc, cache_seqlens, src, counts, block_table, config):
    cpu_cache.kv_compact_forward(kc, vc, cache_seqlens, src.to(torch.int64).contiguous(),
                                 counts.to(torch.int64).contiguous(), block_table, config)


dispatch.register("kv_compact", "reference", dtypes=_ALL)(ref_cache.kv_compact_forward)
dispatch.register("kv_compact", "cpu", supports=_cpu_supports, dtypes=_ALL,
                  default_config=lambda key: {"threads": 0})(_cpu_compact)
def _cuda_compact(*args):
    from posattn.kernels import cuda_cache

    return cuda_cache.kv_compact_forward(*args)


def _triton_compact_space(key):
    from posattn.kernels.triton import cache as tc

    return tc.compact_search_space(key)


dispatch.register("kv_compact", "cuda", supports=_cuda_supports, dtypes=_ALL,
                  default_config=lambda key: {"threads": 128})(_cuda_compact)
dispatch.register("kv_compact", "triton", supports=_triton_supports,
                  default_config=lambda key: {"num_warps": 4}, search_space=_triton_compact_space)(_triton_compact)

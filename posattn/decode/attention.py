"""decode_attention: the public op of the decode engine, its per-signature plans and its
torch.library custom op.

The op lowers every call to one problem that all backends share (see
posattn/kernels/reference/decode.py): packed q [T, Hq, D] (already rotated), a paged cache
[num_blocks, page_size, Hk, D] + block_table (a contiguous [B, S_cap, Hk, D] cache is the
paged cache with one page of S_cap slots per request and block_table = arange(B)), the
new k/v already written at logical slots cache_seqlens[b] + i, cu_seqlens_q and an
optional tree bit mask. Nothing on that path reads a tensor value on the host: a repeated
signature (the plan) runs device work only, so a decode step can be CUDA-graph captured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _plans, dispatch
from posattn.decode import checks as C
from posattn.decode import rotary as R
from posattn.lowered import token_bucket

PLAN_CACHE_SIZE = 256
_PLANS: dict = _plans.new_table()


@dataclass(frozen=True)
class DecodeKey:
    """What the choice of kernel and launch config depends on (shapes only)."""

    device_type: str
    dtype: str
    head_dim: int
    heads_q: int
    heads_k: int
    page_size: int
    paged: bool
    tree: bool
    causal: bool
    windowed: bool
    q_bucket: int          # new tokens per request (Tq, or the mean for ragged q), power-of-two bucket
    kv_bucket: int         # slots per request (capacity), power-of-two bucket
    batch_bucket: int
    kv_lists: str = ""     # per-head key lists (kv_indices): "" none, "kv" one per KV head, "q" one per query head
    budget_bucket: int = 1   # power-of-two bucket of the lists' length (1 without lists)
    rotary: str = ""       # in-kernel rotation: "" none, "q" (q only: qk_precision over a rotated cache),
    #                        "k" (pre-RoPE cache: keys rotated per tile), "map" (two products on straddling tiles)
    qk_precision: str = "bf16"


def _dname(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def clear_plans() -> None:
    _PLANS.clear()


class _Plan:
    """What the checks decided for one signature; run() does device work only."""

    def __init__(self, kernel, config, B, Tq, T, HQ, HK, D, capacity, paged, rope, causal, window, scale,
                 return_lse, num_splits, device, key_positions=None, qk_precision="bf16", position_map=None):
        self.kernel, self.config = kernel, config
        self.rotary = R.wants_rotary(rope, key_positions, qk_precision, position_map)
        self.key_positions, self.qk_precision, self.position_map = key_positions, qk_precision, position_map
        self.capacity = capacity
        self.store: dict = {}          # signature-only key tables ("slots")
        self.B, self.Tq, self.T, self.HQ, self.HK, self.D = B, Tq, T, HQ, HK, D
        self.paged, self.rope, self.causal = paged, rope, causal
        self.window = -1 if window is None else int(window)
        self.scale = float(scale)
        self.return_lse, self.num_splits = return_lse, num_splits
        self.max_q = Tq if Tq is not None else max(1, -(-T // B))
        self.block_table = None if paged else torch.arange(B, dtype=torch.int32, device=device)[:, None]
        if Tq is not None:
            self.cu = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=device)[:B + 1]
            tok = torch.arange(T, device=device)
            self.tok_req, self.tok_idx = tok // Tq if Tq else tok, tok % Tq if Tq else tok
        else:
            self.cu = None
            self.arange_t = torch.arange(T, device=device, dtype=torch.int32)

    def _tokens(self, cu):
        """(request of each new token int64 [T], its index within the request int64 [T]), on the device."""
        if self.Tq is not None:
            return self.tok_req, self.tok_idx
        req = torch.searchsorted(cu[1:], self.arange_t, right=True).to(torch.int64)
        return req, self.arange_t.to(torch.int64) - cu[req].to(torch.int64)

    def run(self, q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, k, v, positions, tree_mask,
            kv_indices=None, key_positions=None):
        T, HQ, HK, D = self.T, self.HQ, self.HK, self.D
        cu = cu_seqlens_q if cu_seqlens_q is not None else self.cu
        bt = block_table if block_table is not None else self.block_table
        q3 = q.reshape(T, HQ, D)
        k3 = k.reshape(T, HK, D) if k is not None else None
        if self.rope is not None or k is not None:
            req, idx = self._tokens(cu)
            slots = cache_seqlens.to(torch.int64)[req] + idx                     # logical slot of each token
        rot = None
        if self.rotary:
            if _compiling():
                raise ValueError("decode_attention with key_positions, qk_precision or position_map does not run "
                                 "under torch.compile yet (the custom op takes no rotation tables)")
            rot = R.lower(self.rope, key_positions, self.qk_precision, self.position_map, q3, positions,
                          cache_seqlens, req, idx, self.capacity, self.kernel.backend, self.store)
            if key_positions is None and k3 is not None:      # qk_precision over a rotated cache
                from posattn.rope.ops import apply_rope

                k3 = apply_rope(k3, None, positions.reshape(T) if positions is not None else slots, self.rope,
                                layout="thd")[0]
        elif self.rope is not None:
            from posattn.rope.ops import apply_rope

            pos = positions.reshape(T) if positions is not None else slots
            q3, k3 = apply_rope(q3, k3, pos, self.rope, layout="thd")
        if k is not None:
            ps = k_cache.shape[1]
            page = bt[req, slots // ps].to(torch.int64)
            off = slots % ps
            k_cache[page, off] = k3
            v_cache[page, off] = v.reshape(T, HK, D)
        if q3.stride(-1) != 1:
            q3 = q3.contiguous()
        tm = tree_mask.reshape(T, tree_mask.shape[-1]) if tree_mask is not None else None
        if rot is not None:
            out, lse = self.kernel.fn(q3, k_cache, v_cache, bt, cache_seqlens, cu, tm, self.causal, self.window,
                                      self.scale, self.num_splits, self.max_q, self.config, kv_indices, rot=rot)
        elif _compiling():
            out, lse = torch.ops.posattn.decode_attention(
                q3, k_cache, v_cache, bt, cache_seqlens, cu, tm, self.causal, self.window, self.scale,
                self.num_splits or 0, self.max_q, self.kernel.backend, kv_indices)
        else:
            out, lse = self.kernel.fn(q3, k_cache, v_cache, bt, cache_seqlens, cu, tm, self.causal, self.window,
                                      self.scale, self.num_splits, self.max_q, self.config, kv_indices)
        if self.Tq is not None:
            out = out.reshape(q.shape)
            lse = lse.reshape(self.B, self.Tq, HQ)
        return (out, lse) if self.return_lse else out


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _lists(kv_indices, HQ, HK) -> tuple[str, int]:
    if kv_indices is None:
        return "", 1
    return ("kv" if kv_indices.shape[1] == HK else "q"), token_bucket(kv_indices.shape[2])


def _rotary_kind(rope, key_positions, qk_precision, position_map) -> str:
    if not R.wants_rotary(rope, key_positions, qk_precision, position_map):
        return ""
    return "map" if position_map is not None else ("k" if key_positions is not None else "q")


def _key(q, k_cache, B, Tq, T, HQ, HK, D, capacity, paged, tree, causal, window, kv_indices=None, rotary="",
         qk_precision="bf16") -> DecodeKey:
    mean_q = Tq if Tq is not None else -(-T // B)
    return DecodeKey(q.device.type, _dname(q.dtype), D, HQ, HK, int(k_cache.shape[1]) if paged else 0, paged,
                     tree, causal, window is not None, token_bucket(mean_q), token_bucket(capacity), token_bucket(B),
                     *_lists(kv_indices, HQ, HK), rotary, qk_precision if rotary else "bf16")


def _sig(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                     block_table: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                     k: torch.Tensor | None = None, v: torch.Tensor | None = None, rope=None,
                     positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                     causal: bool = True, window: int | None = None, softmax_scale: float | None = None,
                     return_lse: bool = False, num_splits: int | None = None, backend: str | None = None,
                     kv_indices: torch.Tensor | None = None, page_summary=None, key_positions=None,
                     qk_precision: str = "bf16", position_map=None):
    """Attention of a step's new tokens over a (paged) KV cache: decode, chunked prefill, tree verify
    and sparse decode over selected tokens.

    Args:
        q: [B, Tq, Hq, D] (Tq new tokens per request), or packed [sum(q_lens), Hq, D] with
            ``cu_seqlens_q``. float16, bfloat16 or float32 (float64 on the reference backend).
        k_cache, v_cache: contiguous [B, S_cap, Hk, D], or paged [num_blocks, page_size, Hk, D]
            with ``block_table``; Hq a multiple of Hk (GQA); D <= 256; q's dtype.
        cache_seqlens: int32 [B], the tokens already cached per request (not changed by the call).
        block_table: int32 [B, max_blocks]; logical slot j of request b is at page
            ``block_table[b, j // page_size]``, offset ``j % page_size``. Pages may come in any
            order and be shared between requests.
        cu_seqlens_q: int32 [B+1] boundaries of the packed new tokens (requests may have none).
        k, v: the new tokens' keys and values (q's leading shape, Hk heads): written into the
            cache at logical slots ``cache_seqlens[b] + i`` (after rotation with ``rope``), then
            attended, as flash_attn_with_kvcache does.
        rope: a :class:`posattn.RopeSpec`: q and the new k are rotated (exact angles) first; with
            ``key_positions`` the cache holds keys *before* RoPE instead (as
            ``rope_and_cache(..., rotate_k=False)`` writes them): the kernel rotates each cached
            key at its key position while attending, and the new k is written unrotated.
        positions: q's leading shape, int or float; default ``cache_seqlens[b] + i`` (with a
            key_positions tensor: the key position of the token's own slot).
        key_positions: ``"slots"`` (logical slot s has position s) or int/float [B, S_max] or
            [S_max] (S_max = the capacity: S_cap, or max_blocks * page_size), one position per
            logical slot, the new tokens' slots ``cache_seqlens[b] + i`` included; needs ``rope``
            (single-axis: one inv_freq row). The keys' positions as posattn.select.scores defines them.
        qk_precision: with ``rope``: "bf16" (default: the rotated q/k rounded to the input dtype),
            "bf16x3" (q and pre-RoPE keys rotated in fp32, each split into bf16 hi + lo, the product
            hi.hi + hi.lo + lo.hi: RoPE's relative property survives bf16) or "fp32" (fp32 products).
            Over a rotated cache only q is split. The C++ CPU backend computes in fp32 in every mode.
        position_map: a posattn.ReRoPE / LeakyReRoPE / SelfExtend / VistaRoPE (needs ``rope`` and
            ``key_positions``): each (query, key) pair is rotated near or far per
            posattn/position_maps.py; a key tile pays two products only when it straddles the
            boundary. VistaRoPE's ``visual`` is bool [B, S_max] over logical slots.
        tree_mask: int32 [sum(q_lens), ceil(Tmax/32)] (or [B, Tq, W]): bit j of row i lets new
            token i see new token j of its request; every cached token stays visible.
        causal: without a tree mask, new token i sees new tokens j <= i (else all of them).
        window: a query at logical slot s sees keys at slots j with |s - j| < window.
        softmax_scale: default D ** -0.5.
        return_lse: also return the fp32 log-sum-exp (natural log).
        num_splits: split the keys into this many chunks merged by their LSE (flash-decoding);
            None: the backend's tuned or shape-derived choice.
        backend: force "triton", "cpu" (C++) or "reference".
        kv_indices: int32 [B, Hk, budget] (one list per KV head) or [B, Hq, budget] (per query
            head) of cached slots, -1 padded: each head sees only its listed cached tokens (each
            listed once), plus this step's new tokens by the rules above. Read through the block
            table inside the kernel (no gathered copy).
        page_summary: a posattn.select.PageSummary of this cache (Quest): after ``k`` is written,
            the pages it touched are recomputed (posattn.select.update_page_summary). Needs ``k``
            and q as [B, Tq, Hq, D] (every request appends Tq keys).

    Returns:
        out like q; with ``return_lse``, (out, lse) with lse fp32 [sum(q_lens), Hq] (or [B, Tq, Hq]).
        A query with no visible key gets out = 0 and lse = -inf.

    The first call of a signature checks values too (one device-to-host copy: lengths within
    capacity, block-table entries in range, tree-mask width); later calls of the same
    signature skip every check and read no value on the host.
    """
    if q.__class__ is not torch.Tensor or k_cache.__class__ is not torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(q, DTensor) or isinstance(k_cache, DTensor) or isinstance(v_cache, DTensor):
            from posattn.distributed import dtensor_decode   # heads / batch placements run on the local shards

            if isinstance(key_positions, torch.Tensor):
                raise ValueError("decode_attention on DTensors takes key_positions='slots' only (a key_positions "
                                 "tensor is not sharded with the cache: run the op on each rank's local tensors)")
            return dtensor_decode.decode_attention(
                decode_attention, q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                cu_seqlens_q=cu_seqlens_q, k=k, v=v, positions=positions, tree_mask=tree_mask, kv_indices=kv_indices,
                page_summary=page_summary, rope=rope, causal=causal, window=window, softmax_scale=softmax_scale,
                return_lse=return_lse, num_splits=num_splits, backend=backend, key_positions=key_positions,
                qk_precision=qk_precision, position_map=position_map)
    if page_summary is not None:
        from posattn.select.quest import check_summary_for, update_page_summary

        if k is None or cu_seqlens_q is not None or not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError("page_summary needs k= (the keys this call writes) and q as [B, Tq, Hq, D] "
                             "(packed q with cu_seqlens_q: call posattn.select.update_page_summary per group)")
        check_summary_for(page_summary, k_cache, cache_seqlens, block_table)     # before any launch
        out = decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=block_table, k=k, v=v, rope=rope,
                               positions=positions, tree_mask=tree_mask, causal=causal, window=window,
                               softmax_scale=softmax_scale, return_lse=return_lse, num_splits=num_splits,
                               backend=backend, kv_indices=kv_indices, key_positions=key_positions,
                               qk_precision=qk_precision, position_map=position_map)
        update_page_summary(page_summary, k_cache, cache_seqlens, q.shape[1], block_table=block_table)
        return out
    pk = None
    if not _compiling() and q.__class__ is torch.Tensor:
        pk = (_sig(q), _sig(k_cache), _sig(v_cache), _sig(cache_seqlens), _sig(block_table), _sig(cu_seqlens_q),
              _sig(k), _sig(v), rope, _sig(positions), _sig(tree_mask), causal, window, softmax_scale, return_lse,
              num_splits, backend, dispatch.context_backend(), dispatch.env_backend_raw(), _sig(kv_indices),
              key_positions if isinstance(key_positions, str) else _sig(key_positions), qk_precision, position_map)
        try:
            plan = _PLANS.get(pk)
        except TypeError:       # an unhashable argument: the checks below name it
            plan, pk = None, None
        if plan is not None:
            return plan.run(q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, k, v, positions,
                            tree_mask, kv_indices, key_positions)
    B, Tq, T, HQ, HK, D, capacity = C.check_shapes(q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q,
                                                   k, v, rope, positions, tree_mask, causal, window, softmax_scale,
                                                   return_lse, num_splits, kv_indices)
    R.check(rope, key_positions, qk_precision, position_map, positions, q, B, capacity)
    paged = block_table is not None
    if not _compiling():
        C.check_values(cache_seqlens, cu_seqlens_q, block_table, tree_mask, T, capacity, k_cache.shape[0],
                       k_cache.shape[1], Tq, kv_indices)
    key = _key(q, k_cache, B, Tq, T, HQ, HK, D, capacity, paged, tree_mask is not None, causal, window, kv_indices,
               _rotary_kind(rope, key_positions, qk_precision, position_map), qk_precision)
    if _compiling():
        # dispatch's memo takes a lock Dynamo cannot trace: the custom op resolves the backend
        kernel, config = _NamedOnly(backend or ""), {}
    else:
        kernel, config = dispatch.select("decode_attention", key, backend=backend, device_index=q.device.index)
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    plan = _Plan(kernel, config, B, Tq, T, HQ, HK, D, capacity, paged, rope, causal, window, scale, return_lse,
                 num_splits, q.device, key_positions, qk_precision, position_map)
    if pk is not None:
        _plans.store(_PLANS, pk, plan, PLAN_CACHE_SIZE)
    return plan.run(q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, k, v, positions, tree_mask,
                    kv_indices, key_positions)


@dataclass(frozen=True)
class _NamedOnly:
    backend: str


def lowered_key(q, k_cache, block_table, cu_seqlens_q, tree_mask, causal, window, max_q, kv_indices=None) -> DecodeKey:
    """The kernel key of a lowered problem (q packed, cache paged; what the custom op sees)."""
    T, HQ, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    ps = k_cache.shape[1]
    paged = not (block_table.shape[1] == 1 and k_cache.shape[0] == B)
    return DecodeKey(q.device.type, _dname(q.dtype), D, HQ, k_cache.shape[2], ps if paged else 0, paged,
                     tree_mask is not None, causal, window > 0, token_bucket(max_q),
                     token_bucket(block_table.shape[1] * ps), token_bucket(B), *_lists(kv_indices, HQ, k_cache.shape[2]))


@torch.library.custom_op("posattn::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, cu_seqlens_q: torch.Tensor, tree_mask: torch.Tensor | None,
                         causal: bool, window: int, softmax_scale: float, num_splits: int, max_q: int,
                         backend: str, kv_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    key = lowered_key(q, k_cache, block_table, cu_seqlens_q, tree_mask, causal, window, max_q, kv_indices)
    kernel, config = dispatch.select("decode_attention", key, backend=backend or None, device_index=q.device.index)
    return kernel.fn(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                     softmax_scale, num_splits or None, max_q, config, kv_indices)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window, softmax_scale,
      num_splits, max_q, backend, kv_indices=None):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

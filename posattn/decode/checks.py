"""decode_attention's argument checks: shapes, dtypes and devices (no device work), and the
value checks of the checked path (one small device-to-host copy), each error naming the argument."""
from __future__ import annotations

import torch

from posattn import _validate as V

MAX_HEAD_DIM = 256
POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


def _int32(x, name: str, device, dim: int, what: str) -> None:
    V.tensor(x, name)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor {what}; got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}; got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; all tensors must be on one device")


def check_cache_heads(HQ: int, D: int, k_cache) -> int:
    """k_cache [.., .., Hk, D] against q's head count and head_dim: returns Hk."""
    HK = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache's head_dim ({k_cache.shape[3]}) must equal q's ({D})")
    if D == 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}; got {D}")
    if HK == 0 or HQ % HK:
        raise ValueError(f"q's head count ({HQ}) must be a multiple of k_cache's ({HK}) (GQA)")
    return HK


def check_shapes(q, k_cache, v_cache, cache_seqlens, block_table, cu_seqlens_q, k, v, rope, positions,
                 tree_mask, causal, window, softmax_scale, return_lse, num_splits, kv_indices=None):
    """Every check that reads no tensor values. Returns (B, Tq or None, T, HQ, HK, D, capacity)."""
    V.float_tensor(q, "q")
    V.float_tensor(k_cache, "k_cache")
    V.float_tensor(v_cache, "v_cache")
    dev = q.device
    V.same_device(q, "q", k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens if isinstance(
        cache_seqlens, torch.Tensor) else None)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype {q.dtype}; got k_cache {k_cache.dtype}, "
                        f"v_cache {v_cache.dtype}")
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be 4-D: [num_blocks, page_size, Hk, D] with block_table, "
                         f"[B, S_cap, Hk, D] without; got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in their last (head_dim) dimension")
    if cu_seqlens_q is None:
        if q.dim() != 4:
            raise ValueError(f"q must be [B, Tq, Hq, D] without cu_seqlens_q; got shape {tuple(q.shape)}")
        B, Tq, HQ, D = q.shape
        T = B * Tq
    else:
        if q.dim() != 3:
            raise ValueError(f"q must be packed [sum(q_lens), Hq, D] with cu_seqlens_q; got shape {tuple(q.shape)}")
        T, HQ, D = q.shape
        Tq = None
    HK = check_cache_heads(HQ, D, k_cache)
    _int32(cache_seqlens, "cache_seqlens", dev, 1, "[B] (tokens already cached per request)")
    if block_table is None:
        B_c = k_cache.shape[0]
        capacity = k_cache.shape[1]
    else:
        _int32(block_table, "block_table", dev, 2, "[B, max_blocks] of page indices")
        B_c = block_table.shape[0]
        capacity = block_table.shape[1] * k_cache.shape[1]
    if cu_seqlens_q is None:
        if B != B_c:
            what = "block_table's rows" if block_table is not None else "k_cache's batch size (contiguous [B, S_cap, Hk, D])"
            raise ValueError(f"q's batch size ({B}) must equal {what} ({B_c})")
    else:
        _int32(cu_seqlens_q, "cu_seqlens_q", dev, 1, "[B+1] (new-token boundaries)")
        B = cu_seqlens_q.shape[0] - 1
        if B < 1:
            raise ValueError(f"cu_seqlens_q must have B+1 >= 2 entries; got shape {tuple(cu_seqlens_q.shape)}")
        if B != B_c:
            what = "block_table's rows" if block_table is not None else "k_cache's batch size (contiguous [B, S_cap, Hk, D])"
            raise ValueError(f"cu_seqlens_q describes {B} requests but {what} is {B_c}")
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [B] = [{B}]; got shape {tuple(cache_seqlens.shape)}")
    lead = tuple(q.shape[:-2])
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens' keys and values) or not at all")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            V.float_tensor(x, name)
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}; got {x.dtype}")
            if tuple(x.shape) != lead + (HK, D):
                raise ValueError(f"{name} must be {list(lead + (HK, D))} (q's leading shape, k_cache's "
                                 f"{HK} heads); got {list(x.shape)}")
        V.same_device(q, "q", k=k, v=v)
    if positions is not None and rope is None:
        raise ValueError("positions were given without rope: pass rope=RopeSpec(...) to rotate q and k, "
                         "or drop positions")
    if rope is not None:
        from posattn.rope.spec import RopeSpec

        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be a posattn.RopeSpec or None, got {type(rope).__name__}")
        if rope.head_dim != D:
            raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal q's head_dim ({D})")
        if positions is not None:
            V.tensor(positions, "positions")
            if positions.dtype not in POS_DTYPES:
                raise TypeError(f"positions must be int32, int64, float32 or float64; got {positions.dtype}")
            if tuple(positions.shape) != lead:
                raise ValueError(f"positions must be {list(lead)} (q's leading shape); got {list(positions.shape)}")
            V.same_device(q, "q", positions=positions)
    if tree_mask is not None:
        _int32(tree_mask, "tree_mask", dev, tree_mask.dim() if isinstance(tree_mask, torch.Tensor) else 2,
               "of bit rows")
        ok = (tree_mask.dim() == 2 and tree_mask.shape[0] == T) or (
            Tq is not None and tree_mask.dim() == 3 and tuple(tree_mask.shape[:2]) == (B, Tq))
        if not ok or tree_mask.shape[-1] < 1:
            want = f"[{T}, ceil(Tmax/32)]" + (f" or [{B}, {Tq}, ceil(Tq/32)]" if Tq is not None else "")
            raise ValueError(f"tree_mask must be {want} (one bit row per new token); got {list(tree_mask.shape)}")
        if Tq is not None and tree_mask.shape[-1] * 32 < Tq:
            raise ValueError(f"tree_mask is {tree_mask.shape[-1]} words wide ({tree_mask.shape[-1] * 32} tokens) "
                             f"but requests have {Tq} new tokens: it needs ceil({Tq}/32) = {-(-Tq // 32)} words")
    if kv_indices is not None:
        _int32(kv_indices, "kv_indices", dev, 3, f"[B, Hk or Hq, budget] of cached slots (-1 pads)")
        if kv_indices.shape[0] != B or kv_indices.shape[1] not in (HK, HQ):
            raise ValueError(f"kv_indices must be [{B}, {HK} (Hk) or {HQ} (Hq), budget]; got {list(kv_indices.shape)}")
        if kv_indices.stride(-1) != 1:
            raise ValueError("kv_indices must be contiguous in its last (budget) dimension")
    V.boolean(causal, "causal")
    V.boolean(return_lse, "return_lse")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None; got {window!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None; got {num_splits!r}")
    return B, Tq, T, HQ, HK, D, capacity


def check_values(cache_seqlens, cu_seqlens_q, block_table, tree_mask, T: int, capacity: int, num_blocks: int,
                 page_size: int, Tq, kv_indices=None) -> None:
    """The checks that read values (the checked path: one device-to-host copy)."""
    parts = [cache_seqlens.reshape(-1)]
    if cu_seqlens_q is not None:
        parts.append(cu_seqlens_q.reshape(-1))
    host = torch.cat(parts).to("cpu", torch.int64).tolist()
    B = cache_seqlens.shape[0]
    cs = host[:B]
    if cu_seqlens_q is not None:
        cu = host[B:]
        if cu[0] != 0 or cu[-1] != T:
            raise ValueError(f"cu_seqlens_q must start at 0 and end at {T} (q's token count); "
                             f"got first {cu[0]}, last {cu[-1]}")
        bad = next((b for b in range(B) if cu[b + 1] < cu[b]), None)
        if bad is not None:
            raise ValueError(f"cu_seqlens_q must be non-decreasing; cu_seqlens_q[{bad}] = {cu[bad]} > "
                             f"cu_seqlens_q[{bad + 1}] = {cu[bad + 1]}")
        n = [cu[b + 1] - cu[b] for b in range(B)]
    else:
        n = [Tq] * B
    for b in range(B):
        if cs[b] < 0:
            raise ValueError(f"cache_seqlens must be >= 0; cache_seqlens[{b}] = {cs[b]}")
        if cs[b] + n[b] > capacity:
            raise ValueError(f"cache_seqlens + new tokens exceeds request {b}'s capacity: cache_seqlens[{b}] = "
                             f"{cs[b]} plus {n[b]} new tokens > {capacity} slots")
    if tree_mask is not None and B:
        tmax = max(n)
        if tree_mask.shape[-1] * 32 < tmax:
            raise ValueError(f"tree_mask is {tree_mask.shape[-1]} words wide ({tree_mask.shape[-1] * 32} tokens) "
                             f"but the longest request has {tmax} new tokens: it needs ceil({tmax}/32) = "
                             f"{-(-tmax // 32)} words")
    if kv_indices is not None and kv_indices.numel():
        idx = kv_indices.to("cpu", torch.int64)
        lim = torch.tensor(cs, dtype=torch.int64)[:, None, None]
        bad = (idx < -1) | (idx >= lim)
        if bool(bad.any()):
            b, h, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"kv_indices[{b}, {h}, {i}] = {int(idx[b, h, i])}: entries must be -1 (padding) or a "
                             f"cached slot of request {b}, 0..{cs[b] - 1} (cache_seqlens[{b}] = {cs[b]})")
    if block_table is not None:
        used = [-(-(cs[b] + n[b]) // page_size) for b in range(B)]
        mb = max(used) if used else 0
        if mb:
            tab = block_table[:, :mb].to("cpu", torch.int64)
            cols = torch.arange(mb)[None, :] < torch.tensor(used)[:, None]
            bad = cols & ((tab < 0) | (tab >= num_blocks))
            if bool(bad.any()):
                b, c = (int(x) for x in bad.nonzero()[0])
                raise ValueError(f"block_table[{b}, {c}] = {int(tab[b, c])} is out of range: page indices must "
                                 f"be in 0..{num_blocks - 1} (k_cache has {num_blocks} blocks)")

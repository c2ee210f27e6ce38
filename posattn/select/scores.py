"""posattn.select.scores: how much each cached token matters to each request's query.

Lowering (shared by every backend, contract in posattn/kernels/reference/select_scores.py): a
contiguous cache [B, S, Hk, D] is the paged cache with one page of S slots per request (block_table
= arange(B)); with ``rope=`` the queries are rotated here (tiny) and the keys in the kernel, both by
per-call fp32 cos/sin tables built by posattn/rope/table.py with the kernel's own backend (exact
angles). The reductions over heads run on the kernel's per-head output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.decode.checks import _int32, check_cache_heads
from posattn.kernels.reference.select_scores import rotate_table
from posattn.lowered import token_bucket

REDUCE = ("none", "kv_group", "soft_vote")
_TABLE_BACKEND = {"triton": "triton", "cpu": "cpu", "reference": "reference"}


@dataclass(frozen=True)
class ScoresKey:
    """What the choice of kernel and launch config depends on (shapes only)."""

    device_type: str
    dtype: str
    head_dim: int
    heads_q: int
    heads_k: int
    page_size: int
    rope: bool
    kv_bucket: int
    batch_bucket: int


def _check(q, k_cache, cache_seqlens, block_table, reduce, rope, positions, key_positions, softmax_scale,
           position_map=None):
    V.float_tensor(q, "q")
    V.float_tensor(k_cache, "k_cache")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] (one query per request); got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be 4-D: [num_blocks, page_size, Hk, D] with block_table, "
                         f"[B, S_cap, Hk, D] without; got shape {tuple(k_cache.shape)}")
    V.same_device(q, "q", k_cache=k_cache)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have q's dtype {q.dtype}; got {k_cache.dtype}")
    if k_cache.stride(-1) != 1:
        raise ValueError("k_cache must be contiguous in its last (head_dim) dimension")
    B, HQ, D = q.shape
    HK = check_cache_heads(HQ, D, k_cache)
    _int32(cache_seqlens, "cache_seqlens", q.device, 1, "[B] (tokens cached per request)")
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [{B}] (q's batch); got {list(cache_seqlens.shape)}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"a contiguous k_cache must be [B={B}, S_cap, Hk, D]; got {tuple(k_cache.shape)}")
        S = k_cache.shape[1]
    else:
        _int32(block_table, "block_table", q.device, 2, "[B, max_blocks] of page indices")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must be [{B}, max_blocks]; got {list(block_table.shape)}")
        S = block_table.shape[1] * k_cache.shape[1]
    V.choice(reduce, "reduce", REDUCE)
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    from posattn.position_maps import VistaRoPE, check_position_map

    if check_position_map(position_map, rope) is not None and isinstance(position_map, VistaRoPE):
        position_map.check_visual((B, S), q.device, "one flag per logical cache slot [B, S_max]")
    if rope is None:
        if positions is not None or key_positions is not None:
            raise ValueError("positions and key_positions are read only with rope= (keys cached before RoPE)")
        return B, HQ, HK, D, S
    from posattn.decode.rotary import check_plain_rope
    from posattn.rope.spec import RopeSpec

    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a posattn.RopeSpec or None, got {type(rope).__name__}")
    if rope.head_dim != D:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal q's head_dim ({D})")
    check_plain_rope(rope, q.device, "by scores", "scores supports")
    if key_positions is None:
        raise ValueError('key_positions is required with rope= (a [B, S_max] or [S_max] tensor, or "slots")')
    if isinstance(key_positions, str):
        if key_positions != "slots":
            raise ValueError(f'key_positions must be a tensor or "slots"; got {key_positions!r}')
    else:
        V.int_tensor(key_positions, "key_positions")
        V.same_device(q, "q", key_positions=key_positions)
        if tuple(key_positions.shape) not in ((B, S), (S,)):
            raise ValueError(f"key_positions must be [{B}, {S}] or [{S}] (one position per cached slot); "
                             f"got {list(key_positions.shape)}")
    if positions is not None:
        V.int_tensor(positions, "positions")
        V.same_device(q, "q", positions=positions)
        if tuple(positions.shape) != (B,):
            raise ValueError(f"positions must be [{B}] (each request's query position); got {list(positions.shape)}")
    return B, HQ, HK, D, S


def _tables(rope, q, cache_seqlens, positions, key_positions, S, backend, position_map=None):
    """(qtab [2, B, R/2], ktab [2, B or 1, S, R/2], far) fp32, built by the kernel's table backend.

    far: None, or with a position map (qtab_far [2, B, R/2], ktab_far [2, B or 1, S, R/2] at the
    map's far positions, far_mask bool [B, S]: the pairs (request's query, slot) that use them)."""
    from posattn.position_maps import VistaRoPE
    from posattn.rope.table import cos_sin_table

    t = rope.tables(q.device)
    inv = t.inv_freq.to(torch.float32).contiguous()
    a = float(t.attention_scaling)
    qpos = (cache_seqlens if positions is None else positions).to(torch.int64)
    if isinstance(key_positions, str):
        kpos = torch.arange(S, device=q.device, dtype=torch.int64)
    else:
        kpos = key_positions.to(torch.int64)
    rows = 1 if kpos.dim() == 1 else kpos.shape[0]

    def tabs(qp, kp):
        kt = cos_sin_table(kp.reshape(-1), inv, a, backend=backend).reshape(2, rows, S, inv.shape[0])
        return cos_sin_table(qp, inv, a, backend=backend), kt

    qtab, ktab = tabs(qpos, kpos)
    if position_map is None:
        return qtab, ktab, None
    kp2 = kpos.reshape(rows, S)
    if isinstance(position_map, VistaRoPE):
        vis = position_map.visual
        # the query is the token at slot cache_seqlens[b] (text when that slot is past S_max)
        at = cache_seqlens.to(torch.int64)
        vq = torch.gather(vis, 1, at.clamp(0, max(S - 1, 0))[:, None])[:, 0] & (at < S) if S else at < 0
        far = position_map.is_far(qpos[:, None], kp2, vq[:, None], vis)
    else:
        far = position_map.is_far(qpos[:, None], kp2)
    qf, kf = tabs(position_map.far_q(qpos), position_map.far_k(kpos))
    return qtab, ktab, (qf, kf, far.expand(qpos.shape[0], S))


def scores(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
           block_table: torch.Tensor | None = None, reduce: str = "none", rope=None,
           positions: torch.Tensor | None = None, key_positions=None, softmax_scale: float | None = None,
           position_map=None, backend: str | None = None) -> torch.Tensor:
    """Each cached token's score for each request's query.

    Args:
        q: [B, Hq, D], one query per request (already rotated unless ``rope`` is given).
        k_cache: [num_blocks, page_size, Hk, D] with ``block_table`` int32 [B, max_blocks], or a
            contiguous [B, S_cap, Hk, D]; q's dtype.
        cache_seqlens: int32 [B], tokens cached per request (clamped to S_max).
        reduce: "none" -> [B, Hq, S_max]; "kv_group" -> [B, Hk, S_max], each GQA group's scores
            summed; "soft_vote" -> [B, 1, S_max], TokenSelect's: each head's softmax over the
            request's tokens, summed over heads.
        rope: a RopeSpec when the cache holds keys *before* RoPE: keys are rotated at
            ``key_positions`` (int [B, S_max] or [S_max], or "slots": slot s has position s) and q
            at ``positions`` (int [B]; default ``cache_seqlens``), exact angles.
        softmax_scale: default D^-1/2.
        position_map: a posattn.ReRoPE / LeakyReRoPE / SelfExtend / VistaRoPE (needs ``rope``):
            each (query, key) pair is rotated near (q at its position, k at its key position) or
            far (at the map's far_q / far_k positions), as posattn/position_maps.py defines.
            VistaRoPE's ``visual`` is [B, S_max] per logical slot; the query is the token at slot
            ``cache_seqlens[b]`` (text when that slot is past S_max).
    Returns:
        fp32 [B, Hq | Hk | 1, S_max]: scale * q.k, -inf past each request's length
        (S_max = S_cap, or max_blocks * page_size).
    """
    B, HQ, HK, D, S = _check(q, k_cache, cache_seqlens, block_table, reduce, rope, positions, key_positions,
                             softmax_scale, position_map)
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    if block_table is None:
        bt = torch.arange(B, dtype=torch.int32, device=q.device)[:, None]
    else:
        bt = block_table
    heads = HK if reduce == "kv_group" else HQ          # the query rows the kernel scores
    key = ScoresKey(q.device.type, str(q.dtype).removeprefix("torch."), D, heads, HK, k_cache.shape[1],
                    rope is not None, token_bucket(S), token_bucket(B))
    kernel, config = dispatch.select("scores", key, backend=backend, device_index=q.device.index)
    wide = torch.float64 if kernel.backend == "reference" else torch.float32
    ktab, R, inter, far = None, D, False, None
    qr = q.to(wide)
    if rope is not None:
        R = rope.rotary_dim if rope.rotary_dim is not None else D
        inter = bool(rope.interleaved)
        qtab, ktab, far = _tables(rope, q, cache_seqlens, positions, key_positions, S, _TABLE_BACKEND[kernel.backend],
                                  position_map)

        def rot(t):
            return rotate_table(q.to(wide), t[0][:, None, :].to(wide), t[1][:, None, :].to(wide), R, inter)

        qr = rot(qtab)
        if far is not None:
            far = (rot(far[0]), far[1], far[2].to(torch.uint8).contiguous())
    if reduce == "kv_group":                              # in fp32 (fp64 on the reference)
        qr = qr.view(B, HK, HQ // HK, D).sum(2)
        if far is not None:
            far = (far[0].view(B, HK, HQ // HK, D).sum(2),) + far[1:]
    kw = {"vote": reduce == "soft_vote"}
    if far is not None:
        kw["far"] = far
    return kernel.fn(qr, k_cache, bt, cache_seqlens, scale, ktab, R, inter, config, **kw)

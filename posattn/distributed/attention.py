"""posattn.distributed.anchor_attention: the public context-parallel op."""
from __future__ import annotations

import torch
import torch.distributed as dist

from posattn import _validate as V
from posattn.attention.anchor import check_qkv
from posattn.attention.masks import MaskSpec
from posattn.distributed import _local as L
from posattn.distributed import ring as R
from posattn.distributed.plan import plan_ring
from posattn.distributed.sharding import SHARDS

_PLANS: dict = {}          # (boundaries, mask, W, shard, device) -> (RingPlan, token metadata): every layer
_PLAN_CACHE_SIZE = 16      # of a step shares them
BLOCK_ENGINES = ("auto", "torch", "kernel")


def _plan(cs_h: torch.Tensor, cr_h: torch.Tensor, spec: MaskSpec, W: int, shard: str, device):
    key = (tuple(cs_h.tolist()), tuple(cr_h.tolist()), spec, W, shard, str(device))
    hit = _PLANS.get(key)
    if hit is None:
        from posattn.attention.anchor import check_boundary_values

        check_boundary_values(key[0][-1], cs_h, cr_h, spec.num_anchors)
        plan = plan_ring(key[0], key[1], spec.num_anchors, spec.causal, spec.window, W, shard)
        hit = (plan, R._Meta(plan, cs_h, cr_h, device))
        if len(_PLANS) >= _PLAN_CACHE_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = hit
    return hit


def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     cu_rows: torch.Tensor | None = None, num_anchors: int = 1, causal: bool = True,
                     window: int | None = None, softmax_scale: float | None = None, rope=None,
                     positions: torch.Tensor | None = None, return_lse: bool = False, group=None,
                     shard: str = "zigzag", block_engine: str = "auto"):
    """Context-parallel :func:`posattn.anchor_attention` over the ranks of ``group``.

    Args:
        q: [T_l, Hq, D], k, v: [T_l, Hk, D]: this rank's shard of the step's packed tokens
            (``posattn.distributed.shard_tensor(x, world, rank, shard=shard)``).
        cu_seqlens: int32 [N+1] document boundaries of the whole step (0, ..., T), equal on every rank.
        cu_rows: int32 [R+1] row boundaries of the whole step; default one row.
        num_anchors, causal, window, softmax_scale: as :func:`posattn.anchor_attention`.
        rope: a :class:`posattn.RopeSpec`; q and k are rotated by ``positions`` before the ring.
        positions: [T_l] global positions of this rank's tokens (``shard_positions``), with ``rope``.
        group: the torch.distributed process group (default: the world).
        shard: "zigzag", "contiguous" or "zigzag_doc" (chunks r and 2W-1-r of every document,
            posattn.distributed.sharding): how the step was sharded.
        block_engine: what computes each ring block: "kernel", posattn's C++ attention kernel over
            the block's rectangle of the step (CPU, fp32/fp16/bf16; memory O(T_l) per block, no
            host read per tile); "torch", dense masked products in query tiles (any device and
            dtype; faster on CPU at head_dim 64, where BLAS beats the kernel: docs/distributed.md);
            "auto" (default): "torch".

    Returns:
        out [T_l, Hq, D] (and with ``return_lse`` the fp32 lse [Hq, T_l]) for this rank's tokens,
        equal to the single-process op's rows of those tokens. Differentiable in q, k and v.
    """
    check_qkv(q, k, v)                      # the single-process op's checks, on this rank's shard
    Tl, D = q.shape[0], q.shape[2]
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("posattn.distributed.anchor_attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    for name, b in (("cu_seqlens", cu_seqlens), ("cu_rows", cu_rows)):
        if b is None:
            continue
        V.tensor(b, name)
        if b.dtype != torch.int32 or b.dim() != 1 or b.shape[0] < 2:
            raise ValueError(f"{name} must be an int32 1-D tensor of boundaries [N+1] of the whole step; got "
                             f"{b.dtype} of shape {tuple(b.shape)}")
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=window)      # validates the three
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    V.boolean(return_lse, "return_lse")
    if block_engine not in BLOCK_ENGINES:
        raise ValueError(f"block_engine must be one of {BLOCK_ENGINES}, got {block_engine!r}")
    if block_engine == "kernel" and not L.kernel_ok(q):
        raise ValueError(f"block_engine='kernel' runs posattn's C++ CPU kernel: CPU tensors of fp32, fp16 or bf16 "
                         f"with posattn._C built; got {q.dtype} on {q.device.type}"
                         + ("" if L.kernel_available() else " (posattn._C is not built)"))
    cs_h = cu_seqlens.cpu()                              # the one host read: the schedule depends on it
    T = int(cs_h[-1])
    cr_h = torch.tensor([0, T], dtype=torch.int32) if cu_rows is None else cu_rows.cpu()
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    plan, meta = _plan(cs_h, cr_h, spec, W, shard, q.device)
    if plan.sizes[rank] != Tl:
        raise ValueError(f"q has {Tl} tokens but rank {rank}'s {shard} shard of the step's {T} tokens "
                         f"(world {W}) has {plan.sizes[rank]}")
    if rope is not None:
        from posattn.rope.ops import apply_rope
        from posattn.rope.spec import RopeSpec

        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be a posattn.RopeSpec or None, got {type(rope).__name__}")
        if positions is None:
            raise ValueError("positions [T_local] (global positions of this rank's tokens, shard_positions) "
                             "are required with rope")
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != Tl:
            raise ValueError(f"positions must be a [T_local] = [{Tl}] tensor; got "
                             f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else positions!r}")
        if Tl:                  # a rank without tokens (short documents, zigzag_doc) has nothing to rotate
            q, k = apply_rope(q, k, positions, rope, layout="thd")
    elif positions is not None:
        raise ValueError("positions were given without rope: pass rope=RopeSpec(...) or drop positions")
    ring = R._Ring(plan, meta, group, rank, spec.num_anchors, spec.causal, spec.window, float(softmax_scale),
                   kernel=block_engine == "kernel")
    out, lse = R.RingAttention.apply(q, k, v, ring)
    return (out, lse) if return_lse else out

"""Scale-out on torch.distributed: sequence sharding, context-parallel anchor attention, DTensor rules."""
from posattn.distributed.attention import anchor_attention
from posattn.distributed.plan import RingPlan, plan_ring
from posattn.distributed.sharding import (gather_tensor, shard_indices, shard_positions, shard_ranges, shard_sizes,
                                          shard_tensor)

__all__ = ["anchor_attention", "RingPlan", "plan_ring", "gather_tensor", "shard_indices", "shard_positions",
           "shard_ranges", "shard_sizes", "shard_tensor"]

import torch.distributed as _dist  # noqa: E402

if _dist.is_available():
    from posattn.distributed import dtensor as _dtensor  # noqa: F401  registers the DTensor sharding rules

"""Rotary position embeddings: the spec and the ops."""
from posattn.rope.spec import RopeSpec
from posattn.rope.ops import apply_rope, apply_rope_angles, rope_shift

__all__ = ["RopeSpec", "apply_rope", "apply_rope_angles", "rope_shift"]

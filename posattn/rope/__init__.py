"""Rotary position embeddings: the spec and the ops."""
from posattn.rope.spec import RopeSpec
from posattn.rope.ops import apply_rope

__all__ = ["RopeSpec", "apply_rope"]

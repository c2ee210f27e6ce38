"""Rotary position embeddings: the spec, its scalings, and the ops."""
from posattn.rope.spec import DPE, RopeSpec
from posattn.rope.scaling import NTK, Custom, DynamicNTK, Linear, Llama3, LongRoPE, YaRN
from posattn.rope.ops import apply_rope, apply_rope_angles, rope_shift

__all__ = ["RopeSpec", "DPE", "Linear", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE", "Custom", "apply_rope",
           "apply_rope_angles", "rope_shift"]
from posattn.rope.table import cos_sin_table  # noqa: E402  (the per-call table fused kernels read)

__all__ += ["cos_sin_table"]

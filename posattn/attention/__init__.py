"""Attention ops over structured masks (documents, rows with anchors, windows)."""
from posattn.attention.masks import BlockLists, MaskSpec, lower
from posattn.attention.anchor import anchor_attention
from posattn.attention.plan import AttentionPlan, plan

__all__ = ["AttentionPlan", "BlockLists", "MaskSpec", "anchor_attention", "lower", "plan"]

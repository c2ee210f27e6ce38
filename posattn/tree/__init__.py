"""Draft trees for speculative decoding: Tree, pack/TreeBatch, verify_greedy, Token Recycling."""
from posattn.tree.batch import TreeBatch, pack, verify_greedy
from posattn.tree.recycling import TokenRecycling, default_template
from posattn.tree.tree import Tree

__all__ = ["Tree", "TreeBatch", "pack", "verify_greedy", "TokenRecycling", "default_template"]

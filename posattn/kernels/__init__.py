"""Kernel implementations, one package or module per backend.

Kernels only launch: they take validated tensors and the spec's lowered data
(inv_freq tables, strides, flags) and never import ops, dispatch or autotune.
"""

"""One module per op's benchmark cases.

To add an op (say anchor attention), write ``posattn/bench/ops/attention.py``
and add ``"attention"`` to OP_MODULES. The module looks the op up lazily and
registers nothing when it is not there::

    import posattn
    from posattn.bench.registry import BenchOp, register_op, skip_op

    fn = getattr(posattn, "anchor_attention", None)
    if fn is None:
        skip_op("anchor_attention", "posattn has no anchor_attention yet")
    else:
        op = register_op(BenchOp(name="anchor_attention", make_inputs=..., reference=..., sweep=...,
                                 dtypes=..., bytes=..., flops=..., parse_shape=..., size_name="tokens",
                                 baseline=("sdpa",)))

        @op.backend("triton", available=...)
        def _(inputs, device_type): ...

        @op.peer("sdpa")                     # torch.nn.functional.scaled_dot_product_attention
        def _(inputs, device_type): ...

        @op.peer("flex", full_only=True)     # FlexAttention (compiles: full sweep only)
        def _(inputs, device_type): ...

``reference(inputs)`` returns the fp64 outputs every backend is checked
against; ``sweep(mode, device_type)`` may return [] for a device the op has
no timed kernel on (e.g. Triton-only ops on a CPU). See ops/rope.py.
"""
from __future__ import annotations

import importlib

OP_MODULES = ("rope", "rope_cos_sin", "attention")
OP_MODULES += ("decode",)

_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from posattn.bench import registry

    for mod in OP_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ImportError as e:  # an op module whose dependencies are missing
            registry.skip_op(mod, f"import failed: {e}")
OP_MODULES += ("cache",)  # rope_and_cache, kv_compact (the decode engine's cache writes)

"""One module per op's benchmark cases: rope.py (``apply_rope``), rope_cos_sin.py
(``apply_rope_cos_sin`` and its peers), attention.py (``anchor_attention``), decode.py
(``decode_attention`` and tree attention), cache.py (``rope_and_cache``, ``kv_compact``).

To add an op, write ``posattn/bench/ops/<name>.py`` and add ``"<name>"`` to
OP_MODULES. The module registers one :class:`~posattn.bench.registry.BenchOp`
with its backends and peers; attention.py is the pattern for an op that may be
missing from the installed posattn (it calls ``skip_op`` instead)::

    import posattn
    from posattn.bench.registry import BenchOp, register_op, skip_op

    op = register_op(BenchOp(name="my_op", make_inputs=..., reference=..., sweep=..., dtypes=...,
                             bytes=..., flops=..., parse_shape=..., size_name="tokens",
                             baseline=("sdpa",)))

    @op.backend("triton", available=...)
    def _(inputs, device_type): ...          # returns the callable to time (and optionally a canonicaliser)

    @op.peer("sdpa")                         # a library a user would call instead
    def _(inputs, device_type): ...

    @op.peer("flex", full_only=True)         # slow to set up (compiles): full sweep only
    def _(inputs, device_type): ...

``reference(inputs)`` returns the fp64 outputs every backend is checked
against (or None where no reference is affordable at that size);
``sweep(mode, device_type)`` may return [] for a device the op has no timed
kernel on; ``bytes``/``flops`` are what an ideal kernel moves and computes,
the numerator of % of roofline (posattn/bench/roofline.py).
"""
from __future__ import annotations

import importlib

OP_MODULES = ("rope", "rope_cos_sin", "attention", "decode",
              "cache")  # rope_and_cache, kv_compact (the decode engine's cache writes)

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
OP_MODULES += ("select",)  # select (topk) and sparse_decode (issue 13)
OP_MODULES += ("vq",)  # a2ats: the A2ATS pipeline (issue 14, posattn/bench/ops/vq.py)

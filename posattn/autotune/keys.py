"""The kernel keys ``posattn tune`` builds for a model shape: one builder module per op.

An op's key builder is a module with ``keys(shape, dtype, tokens, device_type) -> list``
(see keys_rope.py); registering it is one line in KEY_BUILDERS. Builders may import the
op's key dataclass from the public op's package (this is the command layer); they are
imported only when that op is tuned.
"""
from __future__ import annotations

import dataclasses
import importlib

KEY_BUILDERS = {
    "rope": "posattn.autotune.keys_rope",
    "rope_cos_sin": "posattn.autotune.keys_rope_cos_sin",
    "decode_attention": "posattn.autotune.ops_decode",   # decode steps over caches of `tokens` slots
    "rope_and_cache": "posattn.autotune.ops_cache",
    "topk": "posattn.autotune.keys_topk",
    "scores": "posattn.autotune.keys_scores",
    "page_scores": "posattn.autotune.keys_page_scores",
    "vq_code_scores": "posattn.autotune.keys_vq_code_scores",
}


def ops() -> tuple[str, ...]:
    """The ops ``posattn tune`` can build keys for."""
    return tuple(KEY_BUILDERS)


def keys_for(op: str, shape, dtype: str, tokens: list[int], device_type: str) -> list:
    """``op``'s kernel keys for a model shape, dtype, token counts and device type."""
    if op not in KEY_BUILDERS:
        raise ValueError(f"op {op!r} has no key builder (known: {', '.join(KEY_BUILDERS)})")
    return importlib.import_module(KEY_BUILDERS[op]).keys(shape, dtype, tokens, device_type)


def make_key(cls, **values):
    """A kernel key of dataclass ``cls`` from named values; fields not named take
    their defaults, and a field with neither is an error naming it."""
    kw = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _no_default(f)]
    if missing:
        raise ValueError(f"posattn tune does not know how to fill {cls.__name__} fields {missing}; "
                         "update the op's key builder (posattn/autotune/keys_<op>.py)")
    return cls(**kw)


def _no_default(f) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def describe_key(key) -> str:
    """A short label of a key for tables: fields at their default and the device say nothing."""
    from posattn.autotune import cache as C

    f = C.key_fields(key)
    # fields at their dataclass default (n_axes=1, rows=1, dpe=False, ...) say nothing
    defaults = ({fl.name: fl.default for fl in dataclasses.fields(key) if fl.default is not dataclasses.MISSING}
                if dataclasses.is_dataclass(key) else {})
    short = {"device_type": None, "dtype": "", "head_dim": "D", "rotary_dim": "R", "heads_q": "Hq", "heads_k": "Hk",
             "pos_dtype": None, "tokens_bucket": "T", "interleaved": None}
    parts = []
    for k, v in f.items():
        if k in ("interleaved", "split"):
            if v:
                parts.append("inter" if k == "interleaved" else "split")
            continue
        if k == "table_dtype":
            parts.append(f"table={v}")
            continue
        if k == "pos_dtype" and "table_dtype" in f:  # cos/sin: cache + positions, or per-token tables
            parts.append(f"pos={v}" if v else "per-token")
            continue
        if k in defaults and v == defaults[k]:
            continue
        lab = short.get(k, k + "=")
        if lab is None:
            continue
        if k == "rotary_dim" and v == f.get("head_dim"):
            continue
        parts.append(f"{lab}{v}" if lab else str(v))
    return " ".join(parts)

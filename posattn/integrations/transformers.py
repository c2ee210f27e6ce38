"""Swap the rotary application of transformers models for posattn's ops (no weights change).

    from posattn.integrations.transformers import apply_posattn
    handle = apply_posattn(model)      # Llama, Mistral, Qwen2, Qwen2-VL, Phi-3
    ...
    handle.remove()                    # or remove_posattn(model)

The model's own rotary module still builds cos/sin (so every scaling it supports — linear,
dynamic NTK, YaRN, Llama 3, LongRoPE, M-RoPE — is kept exactly); what changes is the function
that applies them: each supported modeling module's ``apply_rotary_pos_emb`` (and Qwen2-VL's
vision and, where present, multimodal variants) is replaced by posattn.compat.transformers'
version, which runs the "rope_cos_sin" kernel on the fastest backend for the tensors.

The patch is on the modeling *module*, so it affects every model of that family in the
process until the last handle on that module is removed. transformers is imported lazily.
"""
from __future__ import annotations

import importlib
import threading

__all__ = ["SUPPORTED_FAMILIES", "apply_posattn", "remove_posattn", "PosattnHandle"]

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen2_vl", "phi3")
_FUNCTIONS = ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb", "apply_rotary_pos_emb_vision")

_lock = threading.Lock()
_patched: dict[str, list] = {}  # module name -> [ {fn name: original}, refcount ]


class PosattnHandle:
    """What :func:`apply_posattn` patched; ``remove()`` undoes it (idempotent)."""

    def __init__(self, modules: list[str]):
        self.modules = list(modules)
        self.active = True

    def remove(self) -> None:
        with _lock:
            if not self.active:
                return
            for name in self.modules:
                entry = _patched.get(name)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] == 0:
                    mod = importlib.import_module(name)
                    for fn_name, original in entry[0].items():
                        setattr(mod, fn_name, original)
                    del _patched[name]
            self.active = False

    def __repr__(self):
        return f"PosattnHandle(modules={self.modules}, active={self.active})"


def _family_modules(model) -> list[str]:
    names = set()
    for m in model.modules():
        modname = type(m).__module__
        parts = modname.split(".")
        if len(parts) >= 4 and parts[:2] == ["transformers", "models"] and parts[2] in SUPPORTED_FAMILIES:
            names.add(modname)
    return sorted(names)


def apply_posattn(model) -> PosattnHandle:
    """Patch the rotary application of ``model``'s family; returns a handle (also stored as
    ``model._posattn_handle``). Raises ValueError for a model of an unsupported family."""
    import torch

    from posattn.compat import transformers as door

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    modules = _family_modules(model)
    if not modules:
        raise ValueError(f"apply_posattn supports {', '.join(SUPPORTED_FAMILIES)} models; "
                         f"{type(model).__name__} ({type(model).__module__}) is none of them")
    patched = []
    with _lock:
        for name in modules:
            mod = importlib.import_module(name)
            entry = _patched.get(name)
            if entry is None:
                originals = {}
                for fn_name in _FUNCTIONS:
                    if hasattr(mod, fn_name):
                        originals[fn_name] = getattr(mod, fn_name)
                        setattr(mod, fn_name, getattr(door, fn_name))
                if not originals:
                    continue
                entry = _patched[name] = [originals, 0]
            entry[1] += 1
            patched.append(name)
    handle = PosattnHandle(patched)
    try:
        model._posattn_handle = handle
    except Exception:  # pragma: no cover - a module that refuses attributes
        pass
    return handle


def remove_posattn(model_or_handle) -> None:
    """Undo :func:`apply_posattn` (given the model or the handle it returned)."""
    handle = model_or_handle if isinstance(model_or_handle, PosattnHandle) else getattr(
        model_or_handle, "_posattn_handle", None)
    if handle is None:
        raise ValueError("this model was not patched by apply_posattn")
    handle.remove()
from posattn.integrations.speculative import SpeculativeOutput, speculative_generate  # noqa: E402,F401

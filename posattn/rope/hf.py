"""RopeSpec from a transformers model config (``RopeSpec.from_hf_config``).

Accepted inputs:

* a transformers ``PreTrainedConfig`` (v5: ``config.rope_parameters``; configs built
  with the v4 keywords ``rope_theta=`` / ``rope_scaling=`` are converted by transformers
  itself into ``rope_parameters``). Composite (vision-language) configs are read through
  their text config.
* a plain dict, e.g. a ``config.json``: the v5 layout (``"rope_parameters": {...}``) or
  the v4 layout (top-level ``"rope_theta"`` and ``"rope_scaling": {...}``, with
  ``"type"`` as an old spelling of ``"rope_type"``).

Read from the config: ``head_dim`` (else ``hidden_size // num_attention_heads``),
``partial_rotary_factor`` (rotary_dim = ``int(head_dim * factor)``, as transformers),
``rotary_dim`` (GPT-J, CodeGen), ``max_position_embeddings`` and
``original_max_position_embeddings`` (a top-level value wins, as in transformers'
standardisation), ``mrope_section`` / ``mrope_interleaved``. DeepSeek-V2/V3-style
configs (MLA) set ``head_dim = qk_rope_head_dim``: the spec then describes the rotated
slice of q and k.

The pairing (half-split vs interleaved) is not a config field for most models; it is
inferred from ``config.rope_interleave`` when present, else from ``model_type`` (the
models in ``INTERLEAVED_MODEL_TYPES`` rotate (2p, 2p+1) pairs); pass ``interleaved=``
to override.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from posattn.rope import scaling as sc

SUPPORTED_ROPE_TYPES = ("default", "mrope", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")

# model types whose transformers code rotates interleaved pairs (2p, 2p+1)
INTERLEAVED_MODEL_TYPES = frozenset({
    "gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe", "deepseek_v2",
})
# multi-axis models: Qwen2-VL's contiguous sections, Qwen3-VL's interleaved assignment
CONTIGUOUS_MROPE_MODEL_TYPES = frozenset({
    "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text", "qwen2_5_omni_thinker", "qwen2_5_omni_text",
    "paddleocr_vl", "paddleocr_vl_text",
})
INTERLEAVED_MROPE_MODEL_TYPES = frozenset({
    "qwen3_vl", "qwen3_vl_text", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
})


class _View:
    """Uniform read access to a config object or a config dict."""

    def __init__(self, config):
        self.obj = config
        self.is_dict = isinstance(config, Mapping)

    def get(self, key, default=None):
        if self.is_dict:
            v = self.obj.get(key, default)
        else:
            try:
                v = getattr(self.obj, key, default)
            except RuntimeError:  # heterogeneous configs: an attribute that differs per layer type
                v = default
        return default if v is None else v

    def has(self, key) -> bool:
        return self.get(key) is not None


def _has_rope_info(view: _View) -> bool:
    return any(view.has(k) for k in ("rope_parameters", "rope_scaling", "rope_theta"))


def _text_view(config) -> _View:
    view = _View(config)
    if _has_rope_info(view):
        return view
    # composite (vision-language) configs keep the language model's settings in a sub-config
    if not view.is_dict and hasattr(config, "get_text_config"):
        text = config.get_text_config(decoder=True)
        if text is not config:
            return _View(text)
    for key in ("text_config", "thinker_config", "llm_config", "language_config"):
        sub = view.get(key)
        if sub is not None:
            if isinstance(sub, Mapping) and not sub.get("model_type") and view.get("model_type"):
                sub = {**sub, "model_type": view.get("model_type")}  # the parent's type names the RoPE layout
            return _text_view(sub)
    return view


def _rope_params(view: _View, layer_type: str | None) -> dict:
    params = view.get("rope_parameters")
    if not params:
        params = view.get("rope_scaling")  # v4 layout (dicts, or config objects from before v5)
    params = dict(params) if params else {}
    labels = view.get("_rope_type_labels") or view.get("layer_types") or ()
    nested = [k for k in params if k in labels and isinstance(params[k], Mapping | type(None))]
    if nested:
        if layer_type is None:
            raise ValueError(f"this config has one RoPE per layer type ({', '.join(map(repr, nested))}): "
                             "pass layer_type= to choose one")
        if layer_type not in params:
            raise ValueError(f"layer_type {layer_type!r} is not in the config's rope_parameters "
                             f"(has {', '.join(map(repr, nested))})")
        if params[layer_type] is None:
            raise ValueError(f"layer type {layer_type!r} has no RoPE (rope_parameters[{layer_type!r}] is None)")
        params = dict(params[layer_type])
    elif layer_type is not None and params:
        raise ValueError(f"layer_type={layer_type!r} was given but the config's rope_parameters are not per layer type")
    return params


def from_hf_config(config, *, layer_type: str | None = None, interleaved: bool | None = None):
    """Build a :class:`posattn.RopeSpec` equal to what transformers computes for ``config``.

    Args:
        config: a transformers ``PreTrainedConfig`` or a config dict (``config.json``
            contents, v4 or v5 layout).
        layer_type: for configs with one RoPE per layer type (e.g. ``"sliding_attention"``).
        interleaved: force the pairing; None infers it (module docstring).

    Raises:
        ValueError: an unknown or unsupported ``rope_type`` (named in the message), or a
            config whose head size cannot be determined.
    """
    from posattn.rope.spec import RopeSpec

    if config is None:
        raise TypeError("config must be a transformers PreTrainedConfig or a dict, got None")
    view = _text_view(config)
    params = _rope_params(view, layer_type)

    rope_type = params.get("rope_type", params.get("type")) or "default"
    if not isinstance(rope_type, str):
        raise TypeError(f"rope_type must be a string, got {type(rope_type).__name__}")
    model_type = view.get("model_type") or ""
    if model_type in ("phi3", "phi4_multimodal") and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's old names, renamed the same way by transformers
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r} in the config; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    base = params.get("rope_theta")
    if base is None:
        base = view.get("rope_theta")
    if base is None:
        base = view.get("rotary_emb_base")  # GPT-NeoX before v5
    if base is None:
        base = 10000.0 if view.is_dict else getattr(type(view.obj), "default_theta", 10000.0)

    # MLA models (DeepSeek-V2/V3 and kin) rotate only the qk_rope_head_dim slice; their
    # transformers configs set head_dim to it, a config.json may not
    dims = view  # where the sizes are read: per layer type for heterogeneous configs (Gemma 4)
    if layer_type is not None and not view.is_dict and hasattr(view.obj, "per_layer_config"):
        try:
            dims = _View(view.obj.per_layer_config[layer_type])
        except (KeyError, ValueError, TypeError, RuntimeError):
            dims = view
    head_dim = dims.get("qk_rope_head_dim") or dims.get("head_dim")
    if head_dim is None:
        hidden, heads = dims.get("hidden_size"), dims.get("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("the config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads
    prf = params.get("partial_rotary_factor")
    if prf is None:
        prf = view.get("partial_rotary_factor")
    if prf is None:
        prf = view.get("rotary_pct")  # GPT-NeoX before v5
    if rope_type == "proportional":
        rotary_dim = head_dim
    elif view.has("rotary_dim") and prf is None:
        rotary_dim = int(view.get("rotary_dim"))  # GPT-J, CodeGen
    else:
        rotary_dim = int(head_dim * (1.0 if prf is None else prf))
    if rotary_dim % 2:
        raise ValueError(f"the config's rotary dimension int(head_dim * partial_rotary_factor) = "
                         f"int({head_dim} * {prf}) = {rotary_dim} is odd; RoPE needs an even one")

    max_pos = view.get("max_position_embeddings")
    orig_max = view.get("original_max_position_embeddings")  # a top-level value wins (Phi-3)
    if orig_max is None:
        orig_max = params.get("original_max_position_embeddings", max_pos)

    def need(key, value):
        if value is None:
            raise ValueError(f"rope_type {rope_type!r} needs {key!r} in the config")
        return value

    scaling = None
    if rope_type == "linear":
        scaling = sc.Linear(need("factor", params.get("factor")))
    elif rope_type == "dynamic":
        scaling = sc.DynamicNTK(need("factor", params.get("factor")), int(need("max_position_embeddings", max_pos)))
    elif rope_type == "yarn":
        orig = int(need("original_max_position_embeddings", orig_max))
        factor = params.get("factor")
        if factor is None:
            factor = need("max_position_embeddings", max_pos) / orig
        scaling = sc.YaRN(factor, orig, beta_fast=params.get("beta_fast") or 32, beta_slow=params.get("beta_slow") or 1,
                          mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                          attention_factor=params.get("attention_factor"),
                          truncate=bool(params.get("truncate", True)))
    elif rope_type == "llama3":
        scaling = sc.Llama3(need("factor", params.get("factor")),
                            need("low_freq_factor", params.get("low_freq_factor")),
                            need("high_freq_factor", params.get("high_freq_factor")),
                            int(need("original_max_position_embeddings", orig_max)))
    elif rope_type == "longrope":
        orig = int(need("original_max_position_embeddings", orig_max))
        factor = params.get("factor")
        if factor is None and max_pos is not None:
            factor = max_pos / orig
        scaling = sc.LongRoPE(need("short_factor", params.get("short_factor")),
                              need("long_factor", params.get("long_factor")), orig,
                              attention_factor=params.get("attention_factor"), factor=factor)
    elif rope_type == "proportional":
        scaling = sc.Custom(_proportional_inv_freq(float(base), head_dim, params.get("partial_rotary_factor", 1.0),
                                                   params.get("factor", 1.0)))

    mrope_section = params.get("mrope_section")
    mrope_interleaved = False
    if mrope_section is not None:
        mrope_section = tuple(int(s) for s in mrope_section)
        if model_type in INTERLEAVED_MROPE_MODEL_TYPES:
            mrope_interleaved = True
        elif model_type in CONTIGUOUS_MROPE_MODEL_TYPES:
            mrope_interleaved = False
        else:
            mrope_interleaved = bool(params.get("mrope_interleaved", False))
        if len(mrope_section) != 3:
            raise ValueError(f"mrope_section {list(mrope_section)} must have 3 sections (t, h, w) as transformers "
                             f"reads it; got {len(mrope_section)}")

    if interleaved is None:
        rope_interleave = view.get("rope_interleave")
        interleaved = bool(rope_interleave) if rope_interleave is not None else model_type in INTERLEAVED_MODEL_TYPES
    elif not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool or None, got {type(interleaved).__name__}")

    return RopeSpec(int(head_dim), rotary_dim=rotary_dim, base=float(base), interleaved=interleaved,
                    scaling=scaling, mrope_section=mrope_section, mrope_interleaved=mrope_interleaved)


def _proportional_inv_freq(base: float, head_dim: int, proportion: float, factor: float) -> torch.Tensor:
    """transformers' "proportional" RoPE (the rotated pairs use exponents over head_dim,
    the rest have frequency 0), over all head_dim/2 half-split pairs."""
    angles = int(proportion * head_dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    nope = head_dim // 2 - angles
    inv_freq = torch.cat((rotated, torch.zeros(nope, dtype=torch.float32))) if nope > 0 else rotated
    inv_freq /= factor
    return inv_freq

"""Model shapes for ``posattn tune``: the heads, head_dim and rotary spec of a
transformers config (``--hf-config`` or a preset, which take the same path)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    heads_q: int
    heads_k: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    source: str


def load_hf_config(path: str) -> dict:
    """config.json (or a folder holding one) as a dict, or a ValueError naming --hf-config."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--hf-config: cannot read {p} ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--hf-config: {p} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--hf-config: {p} must hold a JSON object")
    return cfg


def model_shape(cfg: dict, source: str, layer_type: str | None = None) -> ModelShape:
    """Heads, head_dim and the rotary spec (RopeSpec.from_hf_config) of a transformers config
    (dict); ``layer_type`` picks one RoPE of a config that has one per layer type. A config
    posattn cannot read is a ValueError naming ``source``, never a silently plain spec."""
    from posattn.rope.spec import RopeSpec

    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}

    def need_int(*names, default=None):
        for n in names:
            v = cfg.get(n)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"{source}: {n} must be a positive int, got {v!r}")
                return v
        if default is not None:
            return default
        raise ValueError(f"{source}: needs {' or '.join(names)}")

    hq = need_int("num_attention_heads", "n_head", "num_heads")
    hk = need_int("num_key_value_heads", "num_kv_heads", default=hq)
    hd = cfg.get("head_dim")
    if hd is None:
        hd = need_int("hidden_size", "n_embd") // hq
    elif isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
        raise ValueError(f"{source}: head_dim must be a positive int, got {hd!r}")
    try:
        spec = RopeSpec.from_hf_config(cfg, layer_type=layer_type)
    except (ValueError, TypeError) as e:
        hint = " (--layer-type NAME chooses one)" if "layer type" in str(e) else ""
        raise ValueError(f"{source}: {e}{hint}") from None
    return ModelShape(hq, hk, hd, spec.rotary_dim, spec.interleaved, source)

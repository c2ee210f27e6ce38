"""Model presets for ``posattn tune --preset NAME``: the attention shape of a
few well-known models, written out as data in transformers' config.json
vocabulary (so that a preset and ``--hf-config`` take the same path).

Values are from the models' published config.json files.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "llama3-8b": {  # meta-llama/Meta-Llama-3.1-8B
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    },
    "llama2-7b": {  # meta-llama/Llama-2-7b-hf
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
        "rope_theta": 10000.0, "max_position_embeddings": 4096,
    },
    "qwen2-7b": {  # Qwen/Qwen2-7B
        "model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rope_theta": 1000000.0, "max_position_embeddings": 131072,
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.3
        "model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    },
    "gpt-neox-20b": {  # EleutherAI/gpt-neox-20b: partial rotary (a quarter of each head)
        "model_type": "gpt_neox", "hidden_size": 6144, "num_attention_heads": 64,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "max_position_embeddings": 2048,
    },
}


def names() -> list[str]:
    return sorted(PRESETS)


def get(name: str) -> dict:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"--preset must be one of {', '.join(names())}; got {name!r}") from None

"""Real model RoPE configurations, written out (no downloads), in the forms a user can pass.

Each case gives the model's config class, small non-RoPE sizes (the head size and the
RoPE fields are the model's own), ``rope_theta`` and the ``rope_scaling`` dict as the
model's config.json has it (v4 layout). ``forms(case)`` builds it four ways:

* "v4-object": ``ConfigClass(rope_theta=..., rope_scaling={...})`` (transformers 5 converts it)
* "v5-object": ``ConfigClass(rope_parameters={..., "rope_theta": ...})``
* "v4-dict":   a config.json dict with top-level ``rope_theta`` and ``rope_scaling``
* "v5-dict":   a config.json dict with ``rope_parameters``
"""
import copy

import transformers

# Phi-3-mini-128k's layout (48 = 96/2 factors per list, original length 4096, max 131072);
# the factor values here are illustrative, smooth ramps of the same shape.
PHI3_SHORT = [round(1.0 + 0.05 * (i / 47) ** 2, 6) for i in range(48)]
PHI3_LONG = [round(1.0 + 60.0 * (i / 47) ** 3, 6) for i in range(48)]
# Phi-4-mini: longrope with partial_rotary_factor 0.75 (head_dim 128 -> rotary_dim 96)
PHI4_SHORT = [round(1.0 + 0.02 * i / 47, 6) for i in range(48)]
PHI4_LONG = [round(1.0 + 40.0 * (i / 47) ** 2, 6) for i in range(48)]

_SMALL = dict(num_hidden_layers=1, vocab_size=200000, intermediate_size=64)

CASES = {
    # meta-llama/Llama-3.1-8B
    "llama3.1": dict(cls="LlamaConfig", kw=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                              max_position_embeddings=131072),
                     theta=500000.0, scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    # Qwen/Qwen2.5-7B-Instruct with the YaRN block its model card gives for long inputs
    "qwen2-yarn": dict(cls="Qwen2Config", kw=dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                                max_position_embeddings=32768),
                       theta=1000000.0, scaling={"factor": 4.0, "original_max_position_embeddings": 32768,
                                                 "type": "yarn"}),
    # deepseek-ai/DeepSeek-V2-Lite (MLA: the rotated slice is qk_rope_head_dim = 64, interleaved)
    "deepseek-v2-yarn": dict(cls="DeepseekV2Config", kw=dict(hidden_size=2048, num_attention_heads=16,
                                                           qk_rope_head_dim=64, max_position_embeddings=163840),
                             theta=10000.0, scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                                     "mscale_all_dim": 0.707,
                                                     "original_max_position_embeddings": 4096, "type": "yarn"}),
    # DeepSeek-V2-style YaRN with unequal mscales (attention_scaling = m(f, mscale) / m(f, mscale_all_dim))
    "deepseek-yarn-mscale": dict(cls="DeepseekV2Config", kw=dict(hidden_size=2048, num_attention_heads=16,
                                                               qk_rope_head_dim=64, max_position_embeddings=163840),
                                 theta=10000.0, scaling={"factor": 40, "mscale": 1.0, "mscale_all_dim": 0.707,
                                                         "original_max_position_embeddings": 4096, "type": "yarn",
                                                         "beta_fast": 32, "beta_slow": 1}),
    # microsoft/Phi-3-mini-128k-instruct ("su" was its first name for longrope)
    "phi3-longrope": dict(cls="Phi3Config", kw=dict(hidden_size=3072, num_attention_heads=32,
                                                  max_position_embeddings=131072,
                                                  original_max_position_embeddings=4096),
                          theta=10000.0, scaling={"type": "longrope", "short_factor": PHI3_SHORT,
                                                  "long_factor": PHI3_LONG}),
    # microsoft/Phi-4-mini-instruct (partial rotary, longrope)
    "phi4-mini-longrope": dict(cls="Phi3Config", kw=dict(hidden_size=3072, num_attention_heads=24,
                                                       max_position_embeddings=131072,
                                                       original_max_position_embeddings=4096,
                                                       partial_rotary_factor=0.75),
                               theta=10000.0, scaling={"type": "longrope", "short_factor": PHI4_SHORT,
                                                       "long_factor": PHI4_LONG}),
    # a dynamic-NTK Llama (the form Code Llama / Llama 2 users set for long inputs)
    "llama-dynamic": dict(cls="LlamaConfig", kw=dict(hidden_size=4096, num_attention_heads=32,
                                                   max_position_embeddings=4096),
                          theta=10000.0, scaling={"type": "dynamic", "factor": 2.0}),
    # lmsys/longchat-7b-16k: linear position interpolation
    "llama-linear": dict(cls="LlamaConfig", kw=dict(hidden_size=4096, num_attention_heads=32,
                                                  max_position_embeddings=16384),
                         theta=10000.0, scaling={"type": "linear", "factor": 8.0}),
    # Qwen/Qwen2-VL-7B-Instruct (M-RoPE, sections in pairs)
    "qwen2-vl": dict(cls="Qwen2VLTextConfig", kw=dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                                     max_position_embeddings=32768),
                     theta=1000000.0, scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    # Qwen/Qwen2.5-VL-7B-Instruct (same M-RoPE layout as Qwen2-VL)
    "qwen2.5-vl": dict(cls="Qwen2_5_VLTextConfig", kw=dict(hidden_size=3584, num_attention_heads=28,
                                                          num_key_value_heads=4, max_position_embeddings=128000),
                       theta=1000000.0, scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    # Qwen3-VL with the YaRN block its model card suggests for long video, on top of interleaved M-RoPE
    "qwen3-vl-yarn": dict(cls="Qwen3VLTextConfig", kw=dict(hidden_size=4096, num_attention_heads=32,
                                                          num_key_value_heads=8, head_dim=128,
                                                          max_position_embeddings=262144),
                          theta=5000000.0, scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                    "rope_type": "yarn", "factor": 3.0,
                                                    "original_max_position_embeddings": 262144}),
    # Qwen/Qwen3-VL-8B-Instruct (interleaved M-RoPE)
    "qwen3-vl": dict(cls="Qwen3VLTextConfig", kw=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                                     head_dim=128, max_position_embeddings=262144),
                     theta=5000000.0, scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                               "rope_type": "default"}),
}

FORMS = ("v4-object", "v5-object", "v4-dict", "v5-dict")


def config_class(case):
    return getattr(transformers, CASES[case]["cls"])


def make(case: str, form: str):
    c = CASES[case]
    cls = config_class(case)
    kw = {**_SMALL, **copy.deepcopy(c["kw"])}
    scaling = copy.deepcopy(c["scaling"])
    v5 = {**scaling, "rope_theta": c["theta"]}
    if "rope_type" not in v5:
        v5["rope_type"] = v5.pop("type")
    if form == "v4-object":
        return cls(rope_theta=c["theta"], rope_scaling=scaling, **kw)
    if form == "v5-object":
        return cls(rope_parameters=v5, **kw)
    if form == "v4-dict":
        return {"model_type": cls.model_type, **kw, "rope_theta": c["theta"], "rope_scaling": scaling}
    if form == "v5-dict":
        return {"model_type": cls.model_type, **kw, "rope_parameters": v5}
    raise ValueError(form)


def hf_tables(config, seq_len=None):
    """(inv_freq, attention_scaling) from transformers itself, for a config object."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return rotary_class(config).compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def rotary_class(config):
    """The model's own rotary-embedding module class for this config."""
    import importlib

    name = type(config).__name__.removesuffix("Config").removesuffix("Text")
    mod = importlib.import_module(type(config).__module__.replace("configuration_", "modeling_"))
    for cand in (f"{name}TextRotaryEmbedding", f"{name}RotaryEmbedding"):
        if hasattr(mod, cand):
            return getattr(mod, cand)
    raise LookupError(f"no rotary embedding class for {type(config).__name__}")

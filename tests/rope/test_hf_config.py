"""RopeSpec.from_hf_config: every field a transformers config carries, in the forms users pass."""
import copy

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import posattn
from posattn.rope import scaling as sc
from tests.rope.hf_cases import FORMS, make, rotary_class

# case -> (head_dim, rotary_dim, base, interleaved, mrope_section, mrope_interleaved)
EXPECTED = {
    "llama3.1": (128, 128, 500000.0, False, None, False),
    "qwen2-yarn": (128, 128, 1e6, False, None, False),
    "deepseek-v2-yarn": (64, 64, 10000.0, True, None, False),
    "phi3-longrope": (96, 96, 10000.0, False, None, False),
    "phi4-mini-longrope": (128, 96, 10000.0, False, None, False),
    "llama-dynamic": (128, 128, 10000.0, False, None, False),
    "llama-linear": (128, 128, 10000.0, False, None, False),
    "qwen2-vl": (128, 128, 1e6, False, (16, 24, 24), False),
    "qwen3-vl": (128, 128, 5e6, False, (24, 20, 20), True),
    "qwen2.5-vl": (128, 128, 1e6, False, (16, 24, 24), False),
    "qwen3-vl-yarn": (128, 128, 5e6, False, (24, 20, 20), True),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_fields(case, form):
    spec = posattn.RopeSpec.from_hf_config(make(case, form))
    got = (spec.head_dim, spec.rotary_dim, spec.base, spec.interleaved, spec.mrope_section, spec.mrope_interleaved)
    assert got == EXPECTED[case]
    assert spec.n_axes == (3 if EXPECTED[case][4] else 1)


def _hf_multiaxis_cos_sin(config, positions):
    rotary = rotary_class(config)(config)
    x = torch.zeros(1, dtype=torch.float32)
    return rotary(x, positions)


def _ours_cos_sin(spec, positions):
    """cos/sin from the lowered tables, evaluated in fp32 the way transformers does (so that a
    right pair_axis gives bitwise-equal results): angle = float(pos[axis[p]]) * inv_freq[p]."""
    t = spec.tables()
    axis = t.pair_axis.long()
    pos = positions.float()[axis]                        # [R/2, B, S]: each pair's axis
    ang = pos.permute(1, 2, 0) * t.inv_freq              # [B, S, R/2]
    cos, sin = ang.cos() * t.attention_scaling, ang.sin() * t.attention_scaling
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


@pytest.mark.parametrize("case", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-yarn"])
def test_multi_axis_matches_transformers_module(case):
    cfg = make(case, "v4-object")
    spec = posattn.RopeSpec.from_hf_config(cfg)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 3000, (3, 2, 7), generator=g)  # (t, h, w) per token, batch 2, 7 tokens
    cos, sin = _hf_multiaxis_cos_sin(cfg, positions)
    ocos, osin = _ours_cos_sin(spec, positions)
    assert torch.equal(cos, ocos) and torch.equal(sin, osin)
    # the text-only case (all axes equal) reduces to plain RoPE
    same = torch.arange(7).expand(3, 1, 7)
    assert torch.equal(_hf_multiaxis_cos_sin(cfg, same)[0], _ours_cos_sin(spec, same)[0])


def test_multi_axis_composite_configs():
    """What users load: the composite VL config (object, nested text_config dict, flat hub dict)."""
    text = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=1,
                vocab_size=200000, intermediate_size=64, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    want = posattn.RopeSpec(128, base=1e6, mrope_section=(16, 24, 24))
    assert posattn.RopeSpec.from_hf_config(transformers.Qwen2VLConfig(text_config=copy.deepcopy(text))) == want
    assert posattn.RopeSpec.from_hf_config(transformers.Qwen2VLConfig(**copy.deepcopy(text))) == want
    assert posattn.RopeSpec.from_hf_config({"model_type": "qwen2_vl", **copy.deepcopy(text)}) == want
    text3 = dict(hidden_size=4096, num_attention_heads=32, head_dim=128, num_hidden_layers=1, vocab_size=200000,
                 intermediate_size=64, rope_theta=5e6,
                 rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    want3 = posattn.RopeSpec(128, base=5e6, mrope_section=(24, 20, 20), mrope_interleaved=True)
    assert posattn.RopeSpec.from_hf_config(transformers.Qwen3VLConfig(text_config=copy.deepcopy(text3))) == want3
    # a config.json whose text_config has no model_type: the parent's type decides the layout
    flagless = copy.deepcopy(text3)
    del flagless["rope_scaling"]["mrope_interleaved"]
    assert posattn.RopeSpec.from_hf_config({"model_type": "qwen3_vl", "text_config": flagless}) == want3
    # an unknown model type follows the mrope_interleaved flag
    assert posattn.RopeSpec.from_hf_config({"model_type": "my_vl", **copy.deepcopy(text3)}) == want3
    assert not posattn.RopeSpec.from_hf_config({"model_type": "my_vl", **flagless}).mrope_interleaved


def test_partial_rotary_models():
    # GPT-NeoX: rotary_pct (v4 name) -> partial_rotary_factor; Phi: partial_rotary_factor 0.5
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    neox_kw = dict(hidden_size=512, num_attention_heads=4, num_hidden_layers=1, vocab_size=200000,
                   intermediate_size=64, rotary_pct=0.25, rotary_emb_base=10000)
    neox = transformers.GPTNeoXConfig(**neox_kw)
    spec = posattn.RopeSpec.from_hf_config(neox)
    assert (spec.head_dim, spec.rotary_dim, spec.interleaved) == (128, 32, False)
    assert torch.equal(spec.inv_freq(), GPTNeoXRotaryEmbedding.compute_default_rope_parameters(neox)[0])
    assert posattn.RopeSpec.from_hf_config({"model_type": "gpt_neox", **neox_kw}) == spec

    phi = transformers.PhiConfig(hidden_size=2560, num_attention_heads=32, num_hidden_layers=1, vocab_size=200000,
                                 intermediate_size=64, partial_rotary_factor=0.5)
    spec = posattn.RopeSpec.from_hf_config(phi)
    assert (spec.head_dim, spec.rotary_dim) == (80, 40)
    assert torch.equal(spec.inv_freq(), PhiRotaryEmbedding.compute_default_rope_parameters(phi)[0])


def test_interleaved_pairing_inferred():
    gptj = transformers.GPTJConfig(n_embd=4096, n_head=16, rotary_dim=64, n_layer=1, vocab_size=200000)
    spec = posattn.RopeSpec.from_hf_config(gptj)
    assert (spec.head_dim, spec.rotary_dim, spec.interleaved) == (256, 64, True)
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    sincos = create_sinusoidal_positions(50, 64)  # [pos, sin(32) | cos(32)]
    ang = torch.arange(50).float()[:, None] * spec.inv_freq()
    assert torch.equal(sincos, torch.cat((ang.sin(), ang.cos()), 1))
    v3 = dict(hidden_size=1024, num_attention_heads=8, qk_rope_head_dim=64, num_hidden_layers=1, vocab_size=200000,
              intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    assert posattn.RopeSpec.from_hf_config(transformers.DeepseekV3Config(**v3)).interleaved
    assert not posattn.RopeSpec.from_hf_config(transformers.DeepseekV3Config(rope_interleave=False, **v3)).interleaved
    assert not posattn.RopeSpec.from_hf_config(make("deepseek-v2-yarn", "v5-dict"), interleaved=False).interleaved


def test_per_layer_type_rope():
    # Gemma 3: linear x8 with theta 1e6 on full-attention layers, plain theta 1e4 on sliding ones
    g3 = transformers.Gemma3TextConfig(num_hidden_layers=6, vocab_size=300000,
                                       rope_scaling={"rope_type": "linear", "factor": 8.0})
    with pytest.raises(ValueError, match="one RoPE per layer type .*pass layer_type="):
        posattn.RopeSpec.from_hf_config(g3)
    full = posattn.RopeSpec.from_hf_config(g3, layer_type="full_attention")
    inv, scale = ROPE_INIT_FUNCTIONS["linear"](g3, "cpu", layer_type="full_attention")
    assert full.scaling == sc.Linear(8.0) and full.base == 1e6 and torch.equal(full.inv_freq(), inv)
    sliding = posattn.RopeSpec.from_hf_config(g3, layer_type="sliding_attention")
    assert sliding == posattn.RopeSpec(256, base=10000.0)
    with pytest.raises(ValueError, match="layer_type 'chunked' is not in the config"):
        posattn.RopeSpec.from_hf_config(g3, layer_type="chunked")
    # Gemma 4: "proportional" RoPE with a per-layer head_dim (512 on full attention)
    g4 = transformers.Gemma4TextConfig(num_hidden_layers=6, vocab_size=300000)
    spec = posattn.RopeSpec.from_hf_config(g4, layer_type="full_attention")
    inv, scale = ROPE_INIT_FUNCTIONS["proportional"](g4.per_layer_config["full_attention"], "cpu",
                                                     layer_type="full_attention")
    assert spec.head_dim == spec.rotary_dim == 512 and isinstance(spec.scaling, sc.Custom)
    assert torch.equal(spec.inv_freq(), inv) and spec.attention_scaling == scale


def test_phi3_old_type_names():
    cfg = make("phi3-longrope", "v4-dict")
    cfg["rope_scaling"]["type"] = "su"
    assert posattn.RopeSpec.from_hf_config(cfg) == posattn.RopeSpec.from_hf_config(make("phi3-longrope", "v4-object"))


def test_from_hf_config_entry_points():
    from posattn.rope.hf import from_hf_config

    cfg = make("llama3.1", "v5-dict")
    assert posattn.RopeSpec.from_hf_config(cfg) == from_hf_config(cfg) == posattn.rope.RopeSpec.from_hf_config(cfg)


def _llama_dict(**rope):
    return {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": 4096,
            "rope_theta": 10000.0, **rope}


@pytest.mark.parametrize("config, exc, match", [
    (_llama_dict(rope_scaling={"type": "su", "factor": 2.0}), ValueError, "unknown rope_type 'su'"),
    (_llama_dict(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 1e4}), ValueError,
     "unknown rope_type 'ntk-by-parts'"),
    (_llama_dict(rope_scaling={"type": "linear"}), ValueError, "rope_type 'linear' needs 'factor'"),
    (_llama_dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}), ValueError,
     "needs 'high_freq_factor'"),
    (_llama_dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 64}), ValueError, "needs 'long_factor'"),
    ({"model_type": "llama", "rope_theta": 1e4}, ValueError, "neither head_dim nor hidden_size"),
    ({"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32, "partial_rotary_factor": 0.3125,
      "rope_theta": 1e4}, ValueError, "= 25 is odd"),
    (_llama_dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20, 4]}), ValueError,
     "must have 3 sections"),
    (_llama_dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]}), ValueError,
     r"mrope_section \(16, 24, 20\) must sum to rotary_dim/2 = 64"),
    (None, TypeError, "config must be a transformers PreTrainedConfig or a dict"),
])
def test_bad_configs(config, exc, match):
    with pytest.raises(exc, match=match):
        posattn.RopeSpec.from_hf_config(config)


def test_layer_type_on_flat_config_is_an_error():
    with pytest.raises(ValueError, match="not per layer type"):
        posattn.RopeSpec.from_hf_config(make("llama3.1", "v5-dict"), layer_type="full_attention")
    with pytest.raises(TypeError, match="interleaved must be a bool or None"):
        posattn.RopeSpec.from_hf_config(make("llama3.1", "v5-dict"), interleaved="yes")

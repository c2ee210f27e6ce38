"""apply_posattn on tiny random-weight transformers models built from configs (no downloads):
fp32 logits within 1e-5 relative of the unpatched model, the same greedy tokens, for each
scaling each family uses; the patch really routes through posattn, and it can be undone."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import posattn.compat.transformers as door  # noqa: E402
from posattn.integrations.transformers import apply_posattn, remove_posattn  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
PROMPT = 20  # past original_max_position_embeddings=16 below, so dynamic / long factors engage


def _llama(rope):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, rope_parameters=rope))


def _mistral(rope):
    return transformers.MistralForCausalLM(transformers.MistralConfig(**BASE, rope_parameters=rope))


def _qwen2(rope):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**BASE, rope_parameters=rope))


def _phi3(rope):
    cfg = dict(BASE, num_key_value_heads=4)  # phi3 packs qkv; keep it simple
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg, rope_parameters=rope, pad_token_id=0,
                                                                bos_token_id=1, eos_token_id=2,
                                                                original_max_position_embeddings=16))


def _qwen2_vl(rope):
    text = dict(BASE, rope_parameters=rope)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    return transformers.Qwen2VLForConditionalGeneration(cfg)


CASES = {
    "llama-default": (_llama, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama-llama3": (_llama, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear": (_llama, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama-dynamic": (_llama, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0,
                               "original_max_position_embeddings": 16}),
    "mistral-default": (_mistral, {"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2-default": (_qwen2, {"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2-yarn": (_qwen2, {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                            "original_max_position_embeddings": 16}),
    "qwen2_vl-mrope": (_qwen2_vl, {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
    "phi3-longrope-partial": (_phi3, {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_patched_model_matches(case, monkeypatch):
    make, rope = CASES[case]
    torch.manual_seed(0)
    model = make(rope).eval()
    ids = torch.randint(0, 128, (2, PROMPT))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    calls = []
    real = door.apply_rope_cos_sin
    monkeypatch.setattr(door, "apply_rope_cos_sin", lambda *a, **k: calls.append(1) or real(*a, **k))
    handle = apply_posattn(model)
    try:
        with torch.no_grad():
            logits = model(ids).logits
            n_forward = len(calls)
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    finally:
        handle.remove()
    assert n_forward == model.config.get_text_config().num_hidden_layers, "every layer must go through posattn"
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel <= 1e-5, f"{case}: logits differ by {rel:.2e} relative"
    assert torch.equal(tokens, ref_tokens), f"{case}: greedy tokens differ"
    # undone: the family's module holds transformers' own function again
    mod = __import__(type(model).__module__, fromlist=["x"])
    assert mod.apply_rotary_pos_emb is not door.apply_rotary_pos_emb


def test_handles_are_counted_and_undoable():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    m1, m2 = _llama(CASES["llama-default"][1]), _llama(CASES["llama-default"][1])
    h1 = apply_posattn(m1)
    h2 = apply_posattn(m2)
    assert modeling_llama.apply_rotary_pos_emb is door.apply_rotary_pos_emb
    h1.remove()
    assert modeling_llama.apply_rotary_pos_emb is door.apply_rotary_pos_emb  # m2 still patched
    h1.remove()  # idempotent
    remove_posattn(m2)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not h2.active


def test_unsupported_model_is_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="apply_posattn supports llama"):
        apply_posattn(gpt2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_posattn("llama")

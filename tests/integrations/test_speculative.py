"""speculative_generate gives exactly model.generate(do_sample=False)'s tokens (fp32, small
random-weight Llama / Mistral / Qwen2 models, batch 4, left-padded prompts of different lengths)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from posattn.integrations.transformers import speculative_generate  # noqa: E402
from posattn.tree import TokenRecycling  # noqa: E402

V = 320
LENS = (9, 4, 7, 2)


def _model(family):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        m = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        m = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        m = transformers.Qwen2ForCausalLM(cfg)
    return m.eval()


def _prompts(seed):
    g = torch.Generator().manual_seed(seed)
    S = max(LENS)
    ids = torch.randint(3, V, (len(LENS), S), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(LENS):       # left padding, as transformers expects for generation
        ids[b, :S - n] = 0
        mask[b, :S - n] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_matches_generate(family):
    torch.manual_seed(0)
    model = _model(family)
    ids, mask = _prompts(1)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    out = speculative_generate(model, ids, mask, max_new_tokens=16, drafter=TokenRecycling(V),
                               eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref), f"\n{out.sequences[:, ids.shape[1]:]}\n{ref[:, ids.shape[1]:]}"
    assert out.new_tokens == [16] * 4
    assert 1 <= out.target_forwards <= 16
    assert len(out.accepted) == out.target_forwards - 1
    # requests accept different lengths in the same step (the ragged case kv_compact realigns)
    assert any(len({n for n in step if n is not None}) > 1 for step in out.accepted), out.accepted
    if family == "llama":
        # the same stopping rule for an end-of-sequence token: a token the second request
        # emits midway ends it there, the others keep going (and stop at max_new_tokens)
        eos = int(ref[1, ids.shape[1] + 5])
        ref2 = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                              pad_token_id=1)
        out2 = speculative_generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=1)
        assert torch.equal(out2, ref2), f"\n{out2[:, ids.shape[1]:]}\n{ref2[:, ids.shape[1]:]}"


def test_plain_tensor_result_and_zero_tokens():
    model = _model("llama")
    ids, mask = _prompts(2)
    out = speculative_generate(model, ids, mask, max_new_tokens=0)
    assert torch.equal(out, ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, ids, mask, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(model, ids, mask[:, 1:], max_new_tokens=2)


def test_matches_generate_on_the_triton_kernels():
    """rope_and_cache, tree decode_attention and kv_compact on the Triton backend (the
    interpreter on a CPU): a short run, batch 2, a 6-node template."""
    from tests.conftest import DEVICE

    torch.manual_seed(0)
    model = _model("qwen2").to(DEVICE)
    ids, mask = _prompts(3)
    ids, mask = ids[:2].to(DEVICE), mask[:2].to(DEVICE)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    drafter = TokenRecycling(V, template=([-1, 0, 0, 1, 2, 3], [0, 0, 1, 0, 0, 0]), device=DEVICE)
    out = speculative_generate(model, ids, mask, max_new_tokens=5, drafter=drafter, eos_token_id=None,
                               pad_token_id=0, backend="triton")
    assert torch.equal(out, ref)


def test_any_drafter_with_per_request_trees():
    """A drafter proposing a different tree shape per request (chains of different lengths,
    a bushy tree) still gives generate's tokens; a drafter whose trees grow is refused."""
    from posattn.tree import Tree, pack

    class Shapes:
        def __init__(self, trees, grow=False):
            self.trees, self.grow, self.calls = trees, grow, 0

        def draft(self, last):
            self.calls += 1
            trees = self.trees if not (self.grow and self.calls > 2) else [Tree.from_parents([-1, 0, 1, 2, 3, 4, 5, 6])] * 4
            b = pack(trees, last.device)
            tok = torch.randint(3, V, (b.total_nodes,), generator=torch.Generator().manual_seed(self.calls))
            tok[b.cu_seqlens_q[:-1].long()] = last
            return tok, b

        def update(self, draft, logits, batch):
            pass

    model = _model("llama")
    ids, mask = _prompts(4)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    trees = [Tree.from_parents(p) for p in ([-1], [-1, 0, 1], [-1, 0, 0, 1, 1, 2], [-1, 0])]
    out = speculative_generate(model, ids, mask, max_new_tokens=6, drafter=Shapes(trees), eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="trees grew"):
        speculative_generate(model, ids, mask, max_new_tokens=6, drafter=Shapes(trees, grow=True),
                             eos_token_id=None, pad_token_id=0)


def test_sliding_window_models():
    """A window the sequences outgrow: exact with a chain template; refused with a branching
    tree (decode_attention's window counts cache slots, a tree node's slot is not its position)."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=8)
    model = transformers.MistralForCausalLM(cfg).eval()
    ids, mask = _prompts(5)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    chain = TokenRecycling(V, template=([-1, 0, 1, 2], [0, 0, 0, 0]))
    out = speculative_generate(model, ids, mask, max_new_tokens=10, drafter=chain, eos_token_id=None,
                               pad_token_id=0)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="sliding window of 8"):
        speculative_generate(model, ids, mask, max_new_tokens=10, drafter=TokenRecycling(V), eos_token_id=None,
                             pad_token_id=0)

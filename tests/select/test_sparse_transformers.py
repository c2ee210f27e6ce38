"""apply_sparse_decode on small random-weight Llama / Mistral / Qwen2 models (no downloads), and the
policies on a planted key. Budget >= context: logits equal the dense model's (fp32, 1e-5)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import posattn  # noqa: E402
from posattn.integrations.transformers import apply_sparse_decode  # noqa: E402
from posattn.select import Quest, SelectionCache, TidalDecode, TokenSelect  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)


def _model(family, seed=0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{family}Config")(**BASE)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


def _decode_logits(model, ids, steps):
    """Logits of `steps` greedy decode steps after a dense prefill (teacher-forced on the model's own
    greedy tokens), stacked [steps, B, vocab]."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


POLICIES = {
    "quest": lambda: Quest(budget=64, page_size=4),
    "tokenselect": lambda: TokenSelect(budget=64, threshold=0.9),
    "tidal": lambda: TidalDecode(budget=64, selection_layers=(0, 1), reselection_layer=2),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", ["Llama", "Mistral", "Qwen2"])
def test_budget_beyond_context_equals_dense(family, policy):
    model = _model(family)
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    dense = _decode_logits(model, ids, 5)
    handle = apply_sparse_decode(model, POLICIES[policy]())
    try:
        sparse = _decode_logits(model, ids, 5)
        assert handle.sparse_steps > 0          # the decode steps really ran on the engine with kv_indices
    finally:
        handle.remove()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation != "posattn_sparse"
    again = _decode_logits(model, ids, 5)
    torch.testing.assert_close(again, dense, rtol=0, atol=0)


def test_small_budget_changes_the_output_and_remove_restores():
    """A budget far below the context really restricts attention (the logits move), and remove() undoes it."""
    model = _model("Llama", seed=3)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    dense = _decode_logits(model, ids, 3)
    h = apply_sparse_decode(model, Quest(budget=16, page_size=8))
    sparse = _decode_logits(model, ids, 3)
    h.remove()
    h.remove()   # idempotent
    assert not torch.allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_decode_logits(model, ids, 3), dense, rtol=0, atol=0)


def test_greedy_agreement_long_prompt(capsys):
    """Reported, not asserted beyond sanity: greedy tokens with each policy vs dense on a 300-token prompt
    (random weights: a mechanical figure, not a quality claim)."""
    model = _model("Qwen2", seed=5)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:]
    for name, mk in (("quest", lambda: Quest(128, 16)), ("tokenselect", lambda: TokenSelect(128, 0.9)),
                     ("tidal", lambda: TidalDecode(128, (0,), 2))):
        h = apply_sparse_decode(model, mk())
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:]
        h.remove()
        agree = float((out == dense).float().mean())
        print(f"greedy agreement {name} budget 128 / 300-token prompt: {agree:.2f}")
        assert 0.0 <= agree <= 1.0


def _planted(B=2, S=200, HQ=4, HK=2, D=16, t_star=(37, 150), head=1, seed=0):
    """q [B, Hq, D] and a post-RoPE cache [B, S, Hk, D] (HF's layout viewed) in which slot t_star[b]
    of KV head `head // G` is 6 x q[b, head] / |q|: it dominates that head's scores."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, D, generator=g)
    hf = torch.randn(B, HK, S, D, generator=g)
    G = HQ // HK
    for b in range(B):
        hf[b, head // G, t_star[b]] = 6 * q[b, head] / q[b, head].norm() * D ** 0.5
    return q, hf.transpose(1, 2), torch.full((B,), S - 1, dtype=torch.int32)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_planted_key_is_chosen(policy):
    t_star = (37, 150)
    for seed in range(3):
        q, kc, cs = _planted(t_star=t_star, seed=seed)
        pol = {"quest": Quest(16, 4), "tokenselect": TokenSelect(16, 0.9), "tidal": TidalDecode(16, (0,))}[policy]
        pol.reset()
        idx = pol.select(0, q, kc, cs, 16 ** -0.5)
        if idx is None:                    # TidalDecode's selection layer is dense: the next layer reuses
            idx = pol.select(1, q, kc, cs, 16 ** -0.5)
        G = q.shape[1] // idx.shape[1]
        for b in range(2):
            row = idx[b, 1 // G] if idx.shape[1] != q.shape[1] else idx[b, 1]
            assert t_star[b] in row.tolist(), (policy, seed, b)


def test_selection_cache_reuses_for_similar_queries():
    c = SelectionCache(0.95)
    q = torch.randn(2, 4, 8)
    a = torch.tensor([[[0, 3, 5, 9, -1, -1]], [[1, 2, 4, 6, 7, 8]]], dtype=torch.int32)
    b = a + 100
    L = torch.tensor([10, 10], dtype=torch.int32)
    assert torch.equal(c.choose(q, a, L), a)
    q2 = q.clone()
    q2[1] = torch.randn(4, 8)                       # request 1's query changed, request 0's did not
    out = c.choose(q2, b, L + 1)
    # request 0 reuses its list plus slot 10 (cached since) in its padding; request 1 takes the fresh one
    assert out[0].tolist() == [[0, 3, 5, 9, 10, -1]] and torch.equal(out[1], b[1])
    assert c.reused.tolist() == [1, 0]
    out = c.choose(q2, b, L + 3)                    # both reuse now; a full list stays as it is
    assert out[0].tolist() == [[0, 3, 5, 9, 10, 11]] and torch.equal(out[1], b[1])


def test_bad_input():
    with pytest.raises(ValueError, match="budget must be at most 8192"):
        TokenSelect(9000)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        Quest(0)
    with pytest.raises(ValueError, match=r"budget \(8\) must hold at least one page of 16"):
        Quest(8, 16)
    with pytest.raises(ValueError, match=r"sinks \+ window \(4 \+ 8\) must be at most budget \(10\)"):
        TidalDecode(10, sinks=4, window=8)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        SelectionCache(2.0)
    with pytest.raises(ValueError, match="selection_layers must be a non-empty"):
        TidalDecode(16, selection_layers=())
    with pytest.raises(TypeError, match="policy must be a posattn.select policy"):
        apply_sparse_decode(_model("Llama"), "quest")
    with pytest.raises(ValueError, match="apply_sparse_decode supports llama, mistral, qwen2"):
        apply_sparse_decode(torch.nn.Linear(2, 2), Quest(16, 4))
    m = _model("Llama")
    h = apply_sparse_decode(m, Quest(16, 4))
    with pytest.raises(ValueError, match="already has sparse decode applied"):
        apply_sparse_decode(m, Quest(16, 4))
    h.remove()


def test_selection_cache_plan_skips_scoring_of_reused_requests(monkeypatch):
    """plan() gives the requests that reuse a length of 0, so TokenSelect's scores and topk read no
    key of theirs; the chosen lists are those of the unplanned cache (fresh computed for all)."""
    from posattn import dispatch

    kern = dispatch.kernels("scores")["cpu"]
    seen = []

    def spy(q, k_cache, bt, cs, *a, **kw):
        seen.append(cs.tolist())
        return kern.fn(q, k_cache, bt, cs, *a, **kw)

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 16, generator=g)
    kc = torch.randn(2, 64, 2, 16, generator=g)
    cs = torch.tensor([40, 50], dtype=torch.int32)
    pol = TokenSelect(8, 0.95)
    first = pol.select(0, q, kc, cs, 0.25)
    q2 = q.clone()
    q2[1] = torch.randn(4, 16, generator=g)             # request 1's query changed, request 0's did not
    monkeypatch.setitem(dispatch._registry["scores"], "cpu", type(kern)(**{**kern.__dict__, "fn": spy}))
    dispatch.clear_memo()                               # dispatch memoises its choice of kernel
    try:
        out = pol.select(0, q2, kc, cs + 1, 0.25)
    finally:
        monkeypatch.undo()
        dispatch.clear_memo()
    assert seen == [[0, 51]]                            # request 0 was not scored
    plain = SelectionCache(0.95)                        # the same choice without plan(): fresh for both
    vote = posattn.select.scores(q, kc, cs, reduce="soft_vote", softmax_scale=0.25, backend="cpu")
    plain.choose(q, posattn.select.topk(vote, 8, lengths=cs), cs)
    vote = posattn.select.scores(q2, kc, cs + 1, reduce="soft_vote", softmax_scale=0.25, backend="cpu")
    want = plain.choose(q2, posattn.select.topk(vote, 8, lengths=cs + 1), cs + 1)
    assert torch.equal(out, want.expand(2, 2, 8)) and torch.equal(out[0], first[0])
    assert pol.caches[0].reused.tolist() == [1, 0]

"""posattn.select.A2ATS on small random-weight transformers models (no downloads): budget >= context
equals dense (fp32, 1e-5); the prefill's queries reach the fit; a planted key is chosen; bad input."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import posattn  # noqa: E402
from posattn.integrations.transformers import apply_sparse_decode  # noqa: E402
from posattn.select import A2ATS  # noqa: E402
from tests.select.test_sparse_transformers import _decode_logits, _model  # noqa: E402


@pytest.mark.parametrize("family,reduce", [("Llama", "kv_group"), ("Mistral", "none"), ("Qwen2", "kv_group"),
                                           ("Llama", "none")])
def test_budget_beyond_context_equals_dense(family, reduce):
    model = _model(family)
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    dense = _decode_logits(model, ids, 5)
    pol = A2ATS(budget=64, n_codes=8, window=4, reduce=reduce, iters=3)
    handle = apply_sparse_decode(model, pol)
    try:
        sparse = _decode_logits(model, ids, 5)
        assert handle.sparse_steps > 0
    finally:
        handle.remove()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # every layer's codebook was fitted with its prefill queries (the observe_prefill hook)
    assert pol.query_aware == {i: True for i in range(4)}
    # codes kept up with the cache: at the 5th step it holds 23 prompt + 5 new tokens, all coded
    assert all(st.coded == 23 + 5 for st in pol.layers.values())


def test_small_budget_changes_the_output():
    model = _model("Llama", seed=3)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    dense = _decode_logits(model, ids, 3)
    h = apply_sparse_decode(model, A2ATS(budget=16, n_codes=16, window=4, iters=3))
    sparse = _decode_logits(model, ids, 3)
    h.remove()
    assert not torch.allclose(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce", ["none", "kv_group"])
def test_planted_key_is_chosen(reduce):
    """A key made to dominate one head's windowed-rotation score (far from the query: rotated at
    `window` against the unrotated key) is among the chosen tokens, with few codes."""
    from tests.vq._oracle import rotate

    B, S, HQ, HK, D, W = 2, 200, 4, 2, 16, 8
    spec = posattn.RopeSpec(head_dim=D)
    t_star = (37, 150)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q_pre = torch.randn(B, HQ, D, generator=g)
        k_pre = torch.randn(B, S, HK, D, generator=g)
        L = S - 1
        qf = rotate(q_pre, torch.tensor(float(W)), spec).float()                   # far query
        for b in range(B):
            k_pre[b, t_star[b], 1 // 2] = 6 * qf[b, 1] / qf[b, 1].norm() * D ** 0.5
        # the policy sees post-RoPE q (at L) and keys (at their slots), as in transformers
        q_post = rotate(q_pre, torch.tensor(float(L)), spec).float()
        k_post = rotate(k_pre, torch.arange(S, dtype=torch.float64)[None, :, None], spec).float()
        pol = A2ATS(budget=16, n_codes=8, window=W, rope=spec, reduce=reduce, iters=5, seed=seed)
        # a prefill of 32 queries near this step's (queries of one request look alike), post-RoPE at
        # positions L-32 .. L-1, as apply_sparse_decode hands them over
        T = 32
        pre = q_pre[:, :, None, :] + 0.3 * torch.randn(B, HQ, T, D, generator=g)
        pos = torch.arange(L - T, L, dtype=torch.float64)[None, None, :]
        pol.observe_prefill(0, rotate(pre, pos, spec).float(), torch.empty(B, HK, L, D))
        idx = pol.select(0, q_post, k_post, torch.full((B,), L, dtype=torch.int32), D ** -0.5)
        assert idx.shape == (B, HQ if reduce == "none" else HK, 16)
        assert pol.query_aware == {0: True}
        for b in range(B):
            assert t_star[b] in idx[b, 1 if reduce == "none" else 0].tolist(), (seed, b)


def test_bad_input():
    with pytest.raises(ValueError, match="budget must be a positive int"):
        A2ATS(0, 8, 4)
    with pytest.raises(ValueError, match="n_codes must be a positive int"):
        A2ATS(16, 0, 4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        A2ATS(16, 8, 0)
    with pytest.raises(TypeError, match="rope must be a posattn.RopeSpec"):
        A2ATS(16, 8, 4, rope="llama")
    with pytest.raises(ValueError, match="reduce must be"):
        A2ATS(16, 8, 4, reduce="soft_vote")
    pol = A2ATS(16, 8, 4)
    with pytest.raises(ValueError, match="A2ATS needs the model's rotary spec"):
        pol.select(0, torch.randn(1, 2, 16), torch.randn(1, 20, 2, 16), torch.tensor([19], dtype=torch.int32), 0.25)


def test_greedy_agreement_long_prompt(capsys):
    """Reported, not asserted beyond sanity: greedy tokens with A2ATS vs dense on a 300-token prompt
    (random weights: a mechanical figure, not a quality claim)."""
    model = _model("Qwen2", seed=5)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:]
    for reduce in ("kv_group", "none"):
        h = apply_sparse_decode(model, A2ATS(128, 32, 16, reduce=reduce, iters=5))
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:]
        h.remove()
        agree = float((out == dense).float().mean())
        print(f"greedy agreement A2ATS(128, 32 codes, window 16, reduce={reduce}) / 300-token prompt: {agree:.2f}")
        assert 0.0 <= agree <= 1.0


def test_steady_state_step_makes_no_host_sync(monkeypatch):
    """After the fit, a step (codes of the new token, far queries, windowed scores, topk) stays on the
    device: every host-synchronising tensor method raises inside it."""
    from tests.attention.test_plan import SYNCS, HostSync

    B, S, HQ, HK, D = 2, 60, 4, 2, 16
    spec = posattn.RopeSpec(head_dim=D)
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(B, S + 1, HK, D, generator=g)
    q = torch.randn(B, HQ, D, generator=g)
    for reduce in ("kv_group", "none"):
        pol = A2ATS(budget=8, n_codes=4, window=4, rope=spec, reduce=reduce, iters=2)
        first = pol.select(0, q, kc[:, :S], torch.full((B,), S - 1, dtype=torch.int32), D ** -0.5)
        cs = torch.full((B,), S, dtype=torch.int32)
        with monkeypatch.context() as m:
            for name in SYNCS:
                def boom(self, *a, _name=name, **kw):
                    raise HostSync(f"host sync: Tensor.{_name}()")
                m.setattr(torch.Tensor, name, boom)
            idx = pol.select(0, q, kc, cs, D ** -0.5)
        assert idx.shape == first.shape and pol.layers[0].coded == S + 1


def test_chunked_prefill_adds_to_the_fit_sample():
    spec = posattn.RopeSpec(head_dim=16)
    pol = A2ATS(budget=8, n_codes=4, window=4, rope=spec, max_fit_queries=50)
    pol.observe_prefill(0, torch.randn(1, 2, 20, 16), torch.empty(1, 1, 20, 16))       # a new sequence
    assert pol.layers[0].queries.shape == (20, 2, 16)
    pol.observe_prefill(0, torch.randn(1, 2, 20, 16), torch.empty(1, 1, 40, 16))       # its next chunk
    assert pol.layers[0].queries.shape == (40, 2, 16)
    pol.observe_prefill(0, torch.randn(1, 2, 30, 16), torch.empty(1, 1, 70, 16))       # capped, evenly spaced
    assert pol.layers[0].queries.shape == (50, 2, 16)
    pol.observe_prefill(0, torch.randn(1, 2, 10, 16), torch.empty(1, 1, 10, 16))       # another sequence
    assert pol.layers[0].queries.shape == (10, 2, 16)

"""posattn.attention.plan: the sync-free path of anchor_attention (CUDA-graph capturable).

On CPU, host synchronisation is observable as calls of .item(), .tolist(), .cpu() (and the
implicit conversions): the planned path's forward and backward must make none, and give
results identical to the checked path's."""
import pytest
import torch

import posattn
from posattn.attention import plan as make_plan
from tests.attention.layouts import random_layout
from tests.conftest import DEVICE, usable_backends

# the reference backend evaluates a dense mask on the host: it is the oracle, not a planned path
BACKENDS = [b for b in usable_backends("anchor_attention") if b != "reference"]
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """A context in which any host-synchronising tensor method raises."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            for name in SYNCS:
                def boom(self, *a, _name=name, **kw):
                    raise HostSync(f"host sync: Tensor.{_name}() on the planned path")
                m.setattr(torch.Tensor, name, boom)
            yield
    return ctx


def _case(seed=0, T=40, HQ=4, HK=2, D=32, dtype=torch.float32):
    import random

    rng = random.Random(seed)
    cu, rows = random_layout(rng, T, 2, 2, max_docs=4)
    q, k, v = (torch.randn(T, h, D, dtype=dtype, device=DEVICE).requires_grad_(True) for h in (HQ, HK, HK))
    return q, k, v, cu.to(DEVICE), rows.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", [None, "dynamic"])
def test_planned_path_makes_no_host_sync_and_matches_the_checked_path(backend, scaling, no_host_sync):
    q, k, v, cu, rows = _case()
    spec = posattn.RopeSpec(32, rotary_dim=16,
                            scaling=posattn.DynamicNTK(2.0, 16) if scaling == "dynamic" else None)
    pos = torch.arange(40, device=DEVICE) * 3
    kw = dict(cu_rows=rows, num_anchors=2, window=9, rope=spec, backend=backend)
    out, lse = posattn.anchor_attention(q, k, v, cu, positions=pos, return_lse=True, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))

    p = make_plan(q, k, cu, max_seqlen=int(pos.max()) + 1, **kw)
    with no_host_sync():
        for _ in range(2):           # a second call: nothing is lazily built on the first one
            out2, lse2 = posattn.anchor_attention(q, k, v, cu, positions=pos, return_lse=True, plan=p, **kw)
            grads2 = torch.autograd.grad((out2, lse2), (q, k, v), (dout, dlse))
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)


def test_checked_path_does_sync(no_host_sync):
    """The patch sees the checked path's boundary check (so the test above can fail)."""
    q, k, v, cu, rows = _case()
    with no_host_sync(), pytest.raises(HostSync):
        posattn.anchor_attention(q, k, v, cu, cu_rows=rows, num_anchors=2, backend=BACKENDS[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_keeps_lists_for_the_backward(backend, monkeypatch):
    """The backward lowers nothing when the plan (or the forward) holds its lists."""
    from posattn.attention import _op

    q, k, v, cu, rows = _case(1)
    p = make_plan(q, k, cu, cu_rows=rows, num_anchors=2, backend=backend)
    calls = []
    monkeypatch.setattr(_op, "lower", lambda *a, **kw: calls.append(a))
    out = p(q, k, v)
    out.sum().backward()
    assert not calls


def test_eager_path_reuses_forward_lists_when_block_sizes_match(monkeypatch):
    """Without a plan the forward lowers once; with equal forward and backward block sizes (the
    C++ kernel's default), the backward takes the lists from the autograd context."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ module is not built")
    from posattn.attention import _op, anchor

    q, k, v, cu, rows = _case(2)
    lowered = []
    real = anchor.lower
    monkeypatch.setattr(anchor, "lower", lambda *a, **kw: lowered.append(kw) or real(*a, **kw))
    monkeypatch.setattr(_op, "lower", lambda *a, **kw: lowered.append(("op", kw)) or real(*a, **kw))
    out = posattn.anchor_attention(q, k, v, cu, cu_rows=rows, num_anchors=2, backend="cpu")
    out.sum().backward()
    assert lowered == [{"transpose": True}]


def test_plan_refuses_another_layout():
    q, k, v, cu, rows = _case(3)
    p = make_plan(q, k, cu, cu_rows=rows, num_anchors=2, backend=BACKENDS[0])
    with pytest.raises(ValueError, match="cu_seqlens must be the plan's own tensor"):
        posattn.anchor_attention(q, k, v, cu.clone(), cu_rows=rows, num_anchors=2, plan=p)
    with pytest.raises(ValueError, match="num_anchors .1. differs from the plan's .2."):
        posattn.anchor_attention(q, k, v, cu, cu_rows=rows, plan=p)
    with pytest.raises(ValueError, match="q/k shape"):
        p(q[:-1], k[:-1], v[:-1])
    with pytest.raises(ValueError, match="positions were given without rope"):
        p(q, k, v, positions=torch.arange(40, device=DEVICE))
    with pytest.raises(TypeError, match="plan must be a posattn.attention.AttentionPlan"):
        posattn.anchor_attention(q, k, v, cu, plan="p")
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        make_plan(q, k, cu, rope=posattn.RopeSpec(32, scaling=posattn.DynamicNTK(2.0, 16)))
    with pytest.raises(ValueError, match="cu_rows must fall on document boundaries"):
        make_plan(q, k, cu, cu_rows=torch.tensor([0, 1, 40], dtype=torch.int32, device=DEVICE))

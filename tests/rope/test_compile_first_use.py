"""torch.compile with inductor (the default backend), fullgraph=True, on specs used for the
first time inside the compiled function: the tables are built at trace time (RopeSpec.tables;
posattn/rope/spec.py) and the compiled results equal eager ones.

Each spec here is fresh: its tables are not in the cache when the function is compiled
(asserted), which is what broke before ("Dynamo does not know how to enter a `lock`
context manager"). Shapes are small and odd (7 tokens, 3 query heads, head_dim 80): inductor
compiles C++ on the CPU, a few seconds per graph. apply_rope_cos_sin: test_cos_sin_compile.py.
"""
from __future__ import annotations

import pytest
import torch

import posattn
from posattn.rope import spec as spec_mod

from tests._tol import ELEMENTWISE
from tests.conftest import DEVICE


def _fresh(spec: posattn.RopeSpec) -> posattn.RopeSpec:
    """spec, with no tables cached for it (specs compare by value, so drop equal ones too)."""
    for key in [k for k in spec_mod._INV_FREQ_CACHE if len(k) > 1 and k[1] == spec]:
        del spec_mod._INV_FREQ_CACHE[key]
    return spec


def _not_cached(spec) -> bool:
    return not any(len(k) > 1 and k[1] == spec for k in spec_mod._INV_FREQ_CACHE)


def _close(a, b):
    atol, rtol = ELEMENTWISE[a.dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_first_use_of_several_specs_inside_one_compiled_graph():
    """Plain, YaRN (attention scaling), per-head Custom frequencies, Qwen2-VL mrope (three
    position axes) and DPE groups, each first used in the compiled function, plus rope_shift
    with a fresh spec; inductor, fullgraph=True; outputs equal eager to the last bit or within
    one fp32 rounding (the kernels are the same custom ops; inductor only runs the glue)."""
    torch._dynamo.reset()
    D = 80
    plain = _fresh(posattn.RopeSpec(D, base=11003.0))
    yarn = _fresh(posattn.RopeSpec(D, base=11005.0, scaling=posattn.YaRN(4.0, 64)))
    per_head = _fresh(posattn.RopeSpec(D, 48, scaling=posattn.Custom(
        tuple(tuple(1.0 / (9000.0 + 7 * h) ** (2 * p / 48) for p in range(24)) for h in range(3)))))
    mrope = _fresh(posattn.RopeSpec(D, base=11007.0, mrope_section=(10, 15, 15)))
    dpe = _fresh(posattn.RopeSpec(D, base=11009.0, dpe=posattn.DPE((0, 20, 40), (1.0, 4.0), (0.0, 3.0))))
    shift = _fresh(posattn.RopeSpec(D, 64, base=11011.0, interleaved=True))
    specs = (plain, yarn, per_head, mrope, dpe, shift)
    assert all(_not_cached(s) for s in specs)

    def f(q, k, pos, pos3):
        outs = []
        for s in (plain, yarn, per_head, dpe):
            outs += posattn.apply_rope(q, k, pos, s)
        outs += posattn.apply_rope(q, k, pos3, mrope)
        outs.append(posattn.rope_shift(k, 5, shift))
        return outs

    q = torch.randn(2, 7, 3, D, device=DEVICE)
    k = torch.randn(2, 7, 3, D, device=DEVICE)
    pos = torch.tensor([[0, 3, 5, 9, 1000, 70000, 3], [4, 2, 0, 1, 8, 9, 10]], device=DEVICE)
    pos3 = torch.stack([pos, pos * 2, pos + 11])
    got = torch.compile(f, fullgraph=True)(q, k, pos, pos3)
    want = f(q, k, pos, pos3)
    assert len(got) == len(want) == 11
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_first_use_with_gradients(layout):
    """A fresh spec first used in a compiled training step (forward and backward through the
    custom ops' autograd), against the eager step."""
    torch._dynamo.reset()
    spec = _fresh(posattn.RopeSpec(96, 64, base=11013.0 + (layout == "thd")))
    assert _not_cached(spec)

    def step(q, k, pos):
        qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout)
        return (qo * qo).sum() + (ko * torch.arange(ko.shape[-1], device=ko.device)).sum()

    shape_q = (7, 3, 96) if layout == "thd" else (1, 7, 3, 96)
    shape_k = (7, 1, 96) if layout == "thd" else (1, 7, 1, 96)
    q0, k0 = torch.randn(shape_q, device=DEVICE), torch.randn(shape_k, device=DEVICE)
    pos = torch.tensor([6, 5, 4, 3, 2, 1, 123456], device=DEVICE)
    q1, k1 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(q1, k1, pos)
    loss.backward()
    q2, k2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    want = step(q2, k2, pos)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)  # a sum of 7*3*96 squares
    _close(q1.grad, q2.grad)
    _close(k1.grad, k2.grad)


def test_trace_time_marker_is_what_dynamo_reads():
    """spec.py marks its trace-time table builder the way torch._dynamo.assume_constant_result
    does, without importing torch._dynamo at `import posattn`: the marker must stay the one
    that decorator sets (else the tests above fail with a lock error)."""
    def probe():
        return None

    torch._dynamo.assume_constant_result(probe)
    marks = {name for name in vars(probe) if name.startswith("_dynamo")}
    assert marks and all(getattr(spec_mod._tables_at_trace_time, m, None) is True for m in marks)


def test_seq_len_dependent_spec_needs_seq_len_under_compile():
    """DynamicNTK's tables depend on max(positions) + 1, a value a trace cannot read: a compiled
    call without seq_len= is an error that says so; with seq_len= it traces on first use."""
    torch._dynamo.reset()
    spec = _fresh(posattn.RopeSpec(16, base=11017.0, scaling=posattn.DynamicNTK(2.0, 8)))
    q, k = torch.randn(1, 7, 3, 16, device=DEVICE), torch.randn(1, 7, 1, 16, device=DEVICE)
    pos = torch.arange(7, device=DEVICE) * 3

    with pytest.raises(Exception, match="under torch.compile pass seq_len="):
        torch.compile(lambda q, k, p: posattn.apply_rope(q, k, p, spec), fullgraph=True)(q, k, pos)
    got = torch.compile(lambda q, k, p: posattn.apply_rope(q, k, p, spec, seq_len=19), fullgraph=True)(q, k, pos)
    want = posattn.apply_rope(q, k, pos, spec, seq_len=19)
    for g, w in zip(got, want):
        _close(g, w)

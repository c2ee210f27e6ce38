"""anchor_attention with relative-position maps (ReRoPE, Leaky ReRoPE, SelfExtend, VistaRoPE) on
every usable backend against the pair-by-pair fp64 oracle (tests/attention/map_oracle.py):
out, lse and dq/dk/dv, every mask option, 16/32-bit, positions up to 2^20, qk_precision modes;
maps that reduce to plain RoPE give plain RoPE's results; bad input is refused before launch."""
import random

import pytest
import torch

import posattn
from posattn.kernels.triton import interpreting
from tests._tol import assert_close, assert_within
from tests.attention import map_oracle
from tests.attention.layouts import random_layout
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("anchor_attention")

MAPS = {
    "rerope": lambda T, g: posattn.ReRoPE(6),
    "leaky": lambda T, g: posattn.LeakyReRoPE(5, 3.0),
    "selfextend": lambda T, g: posattn.SelfExtend(3, 7),
    "vista": lambda T, g: posattn.VistaRoPE((torch.rand(T, generator=g) < 0.5).to(DEVICE)),
}

CASES = [
    # T, HQ, HK, D, rotary_dim, interleaved, dtype, n_rows, anchors, causal, window, pos dtype, pos base, qkp
    (40, 2, 1, 32, None, False, torch.float32, 2, 1, True, None, torch.int64, (1 << 20) - 200, "bf16"),
    (37, 3, 3, 16, None, True, torch.bfloat16, 1, 2, True, 9, torch.int32, 1000, "bf16"),
    (29, 2, 2, 80, 40, False, torch.float16, 2, 0, False, None, torch.float32, 77, "bf16"),      # D 80, partial
    (7, 3, 1, 96, None, False, torch.bfloat16, 1, 1, False, 4, torch.int64, 5, "bf16x3"),        # 7 tokens, D 96
    (33, 4, 2, 32, None, False, torch.bfloat16, 3, 1, True, None, torch.int64, (1 << 20) - 100, "bf16x3"),
]


def _inputs(case, seed):
    T, HQ, HK, D, rd, inter, dtype, n_rows, na, causal, window, pdt, base, qkp = case
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cu, rows = random_layout(rng, T, n_rows, na, max_docs=3)
    mk = lambda h: torch.randn(T, h, D, generator=g).to(dtype).to(DEVICE).requires_grad_(True)  # noqa: E731
    steps = torch.randint(1, 4, (T,), generator=g)
    pos = base + torch.cumsum(steps, 0) - steps[0]        # increasing, gaps of 1..3, up to 2^20
    pos = pos.to(torch.float32) * 0.75 if pdt == torch.float32 else pos.to(pdt)
    spec = posattn.RopeSpec(D, rotary_dim=rd, interleaved=inter, base=1e4)
    return (mk(HQ), mk(HK), mk(HK)), cu, rows, pos, spec, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MAPS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_map_matches_pair_oracle(backend, kind, case):
    T, HQ, HK, D, rd, inter, dtype, n_rows, na, causal, window, pdt, base, qkp = CASES[case]
    (q, k, v), cu, rows, pos, spec, g = _inputs(CASES[case], 100 + case)
    m = MAPS[kind](T, g)
    out, lse = posattn.anchor_attention(q, k, v, cu.to(DEVICE), cu_rows=rows.to(DEVICE), num_anchors=na,
                                        causal=causal, window=window, rope=spec, positions=pos.to(DEVICE),
                                        position_map=m, return_lse=True, backend=backend, qk_precision=qkp)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    r_out, r_lse, r_grads, bnd = map_oracle.run(
        q, k, v, cu, rows, na, causal, window, (pos, spec.inv_freq(), spec.rotary_dim, inter, 1.0), m,
        dout=dout, dlse=dlse, qk_precision=qkp,
        split_grad_operand=backend == "triton" and dtype == torch.float16,
        bf16_truncates=backend == "triton" and interpreting())
    what = f"{backend} {kind} case {CASES[case]}"
    assert out.dtype == dtype and lse.shape == (HQ, T)
    assert_within(out, r_out, bnd[0], what + " out")
    assert_within(lse, r_lse, bnd[1], what + " lse")
    for name, gr, r, b in zip("qkv", grads, r_grads, bnd[2:]):
        assert_within(gr, r, b, f"{what} d{name}")


def _run(backend, case, seed, **kw):
    T, HQ, HK, D, rd, inter, dtype, n_rows, na, causal, window, pdt, base, qkp = case
    (q, k, v), cu, rows, pos, spec, g = _inputs(case, seed)
    out, lse = posattn.anchor_attention(q, k, v, cu.to(DEVICE), cu_rows=rows.to(DEVICE), num_anchors=na,
                                        causal=causal, window=window, rope=spec, positions=pos.to(DEVICE),
                                        return_lse=True, backend=backend, qk_precision=qkp, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(DEVICE)
    return (out, lse) + torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [posattn.ReRoPE(1 << 21), posattn.SelfExtend(1, 4), posattn.LeakyReRoPE(3, 1.0)],
                         ids=["rerope-wide", "selfextend-g1", "leaky-s1"])
def test_maps_that_are_plain_rope_give_plain_rope(backend, m):
    """ReRoPE with a window past every distance never takes the far rotation; SelfExtend with
    group 1 and Leaky ReRoPE with scale 1 rotate far pairs at their own positions: all three are
    plain RoPE (the same tables' values): every score is plain fused RoPE's, so out, lse and dv are
    bit for bit the same; dq and dk sum the near and far pairs' terms in two accumulators (each
    rotated back by its own rotation), so they may differ by the final rounding to the dtype."""
    case = CASES[1] if not isinstance(m, posattn.LeakyReRoPE) else CASES[2]
    plain = _run(backend, case, 5)
    mapped = _run(backend, case, 5, position_map=m)
    for name, a, b in zip(("out", "lse", "dv"), mapped[:2] + mapped[4:], plain[:2] + plain[4:]):
        assert torch.equal(a, b), f"{backend} {m}: {name} differs from plain RoPE by {(a - b).abs().max()}"
    for name, a, b in zip(("dq", "dk"), mapped[2:4], plain[2:4]):
        assert_close(a, b, msg=f"{backend} {m}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_with_a_map_matches_the_eager_call(backend):
    case = CASES[0]
    T = case[0]
    (q, k, v), cu, rows, pos, spec, g = _inputs(case, 9)
    m = posattn.SelfExtend(2, 5)
    p = posattn.attention.plan(q, k, cu.to(DEVICE), cu_rows=rows.to(DEVICE), rope=spec, backend=backend,
                               position_map=m)
    a = posattn.anchor_attention(q, k, v, cu.to(DEVICE), cu_rows=rows.to(DEVICE), rope=spec, positions=pos.to(DEVICE),
                                 position_map=m, backend=backend)
    b = posattn.anchor_attention(q, k, v, None, rope=spec, positions=pos.to(DEVICE), plan=p)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="position_map"):
        p.run(q, k, v, positions=pos.to(DEVICE), position_map=posattn.ReRoPE(3))
    assert T == q.shape[0]


def _small(dtype=torch.float32):
    T, D = 8, 16
    q, k, v = (torch.randn(T, 2, D, dtype=dtype, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu, torch.arange(T, device=DEVICE), posattn.RopeSpec(D)


def test_bad_input_is_refused_before_launch():
    q, k, v, cu, pos, spec = _small()
    with pytest.raises(ValueError, match="position_map needs rope="):
        posattn.anchor_attention(q, k, v, cu, position_map=posattn.ReRoPE(4))
    with pytest.raises(TypeError, match="position_map must be one of"):
        posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, position_map=4)
    with pytest.raises(ValueError, match=r"visual must have shape \(8,\)"):
        posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos,
                                 position_map=posattn.VistaRoPE(torch.zeros(7, dtype=torch.bool, device=DEVICE)))
    mrope = posattn.RopeSpec(16, mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match="one position axis"):
        posattn.anchor_attention(q, k, v, cu, rope=mrope, positions=torch.zeros(3, 8, dtype=torch.int64, device=DEVICE),
                                 position_map=posattn.ReRoPE(4))
    with pytest.raises(ValueError, match="window must be >= 1"):
        posattn.ReRoPE(0)
    with pytest.raises(ValueError, match="group must be >= 1"):
        posattn.SelfExtend(0, 4)
    with pytest.raises(ValueError, match="position_map needs rope="):
        posattn.attention.plan(q, k, cu, position_map=posattn.SelfExtend(2, 4))


def test_dispatch_key_tells_a_map_from_none():
    """The tuner's key (AttnKey) carries the map's code, so a config tuned without a map is not
    reused for the map's kernels (twice the q/k registers); without rotary there is no map."""
    from posattn.attention._op import key_of
    from posattn.position_maps import SELF_EXTEND

    q = torch.zeros(8, 2, 16)
    plain, mapped = key_of(q, q, 16, False, True, -1, 1), key_of(q, q, 16, False, True, -1, 1, "bf16", SELF_EXTEND)
    assert plain.position_map == 0 and mapped.position_map == SELF_EXTEND and plain != mapped
    assert key_of(q, q, 0, False, True, -1, 1, "bf16", SELF_EXTEND).position_map == 0


@pytest.mark.parametrize("kind", ["selfextend", "vista"])
def test_compiles_fullgraph_with_inductor(kind):
    """torch.compile (inductor, fullgraph) with a position map against eager: the map's scalars
    and VistaRoPE's visual tensor enter the op, forward and backward."""
    backend = "cpu" if "cpu" in BACKENDS else BACKENDS[0]
    T = 12
    g = torch.Generator().manual_seed(3)
    m = MAPS[kind](T, g)
    spec = posattn.RopeSpec(32, base=7777.0)
    pos = torch.arange(T, device=DEVICE) * 2
    q, k, v = (torch.randn(T, 2, 32, generator=g).to(DEVICE).requires_grad_(True) for _ in range(3))
    cu = torch.tensor([0, 5, T], dtype=torch.int32, device=DEVICE)

    def step(q, k, v, cu, pos):
        out, lse = posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, return_lse=True, backend=backend,
                                            position_map=m)
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(q, k, v, cu, pos)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss2 = step(q, k, v, cu, pos)
    grads2 = torch.autograd.grad(loss2, (q, k, v))
    torch.testing.assert_close(loss, loss2, atol=0, rtol=1e-6)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)

"""qk_precision of anchor_attention with fused RoPE: "bf16x3" and "fp32" against the exact fp64
oracle (rotated q/k not rounded), and RoPE's relative-position property: the same content at
positions p and p + delta gives the same lse with "bf16x3", not with "bf16"."""
import random

import pytest
import torch

import posattn
from posattn.kernels.triton import interpreting
from tests._tol import assert_within
from tests.attention import oracle
from tests.attention.layouts import random_layout
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("anchor_attention")

CASES = [
    # T, HQ, HK, D, rotary_dim, interleaved, dtype, pos dtype
    (24, 2, 1, 32, None, False, torch.bfloat16, torch.int64),
    (7, 3, 1, 16, None, True, torch.bfloat16, torch.int32),         # 7 tokens, 3 heads
    (20, 2, 2, 80, 40, False, torch.bfloat16, torch.float32),       # head_dim 80, partial rotary, float positions
    (17, 3, 3, 96, 96, True, torch.float16, torch.int64),           # head_dim 96, fp16 split into bf16 parts
]


def _qkv(T, HQ, HK, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(T, h, D, generator=g).to(dtype).to(DEVICE).requires_grad_(True)  # noqa: E731
    return mk(HQ), mk(HK), mk(HK)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bf16x3", "fp32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_and_fp32_products_match_the_exact_oracle(backend, mode, case):
    T, HQ, HK, D, rd, inter, dtype, pdt = CASES[case]
    rng = random.Random(300 + case)
    cu, rows = random_layout(rng, T, 2 if T > 8 else 1, 1)
    q, k, v = _qkv(T, HQ, HK, D, dtype, case)
    pos = torch.randint(0, 1 << 24, (T,), generator=torch.Generator().manual_seed(case))
    pos = (pos.to(torch.float32) * 0.5) if pdt == torch.float32 else pos.to(pdt)
    spec = posattn.RopeSpec(D, rotary_dim=rd, interleaved=inter, base=5e5)
    out, lse = posattn.anchor_attention(q, k, v, cu.to(DEVICE), cu_rows=rows.to(DEVICE), rope=spec,
                                        positions=pos.to(DEVICE), return_lse=True, backend=backend,
                                        qk_precision=mode)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    r_out, r_lse, r_grads, bnd = oracle.run(q, k, v, cu, rows, 1, True, None,
                                            rope=(pos, spec.inv_freq(), spec.rotary_dim, inter, 1.0),
                                            dout=dout, dlse=dlse, with_bounds=True, qk_precision=mode,
                                            split_grad_operand=backend == "triton" and dtype == torch.float16,
                                            bf16_truncates=backend == "triton" and interpreting())
    what = f"{backend} {mode} case {CASES[case]}"
    assert_within(out, r_out, bnd[0], what + " out")
    assert_within(lse, r_lse, bnd[1], what + " lse")
    for name, g, r, b in zip("qkv", grads, r_grads, bnd[2:]):
        assert_within(g, r, b, f"{what} d{name}")


def _lse_at(offset, backend, mode, D=128, T=16, H=2):
    """lse [H, T] of one causal document whose tokens sit at positions offset .. offset + T - 1;
    k = q + small noise (scores of ~|q|^2 / sqrt(D) ~ 11 on the diagonal, as trained q/k align)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(T, H, D, generator=g)
    k = (q + 0.3 * torch.randn(T, H, D, generator=g)).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(T, H, D, generator=g).to(torch.bfloat16).to(DEVICE)
    q = q.to(torch.bfloat16).to(DEVICE)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(T, dtype=torch.int64, device=DEVICE) + offset
    spec = posattn.RopeSpec(D, base=5e5)
    _, lse = posattn.anchor_attention(q, k, v, cu, num_anchors=0, rope=spec, positions=pos, return_lse=True,
                                      backend=backend, qk_precision=mode)
    return lse.double().cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_keeps_the_relative_position_property_with_bf16x3(backend):
    """Same q/k/v content at positions 16.. and 16 + delta.. (delta up to 2^24): "bf16x3" keeps
    lse within 1e-4 relative; "bf16" (rotated q/k rounded once to bf16) moves it by far more,
    so the test measures something."""
    base = _lse_at(16, backend, "bf16x3")
    base16 = _lse_at(16, backend, "bf16")
    assert float(base.abs().min()) > 1.0          # relative differences are meaningful
    worst16 = 0.0
    for delta in (1 << 12, 1 << 20, 1 << 24):
        moved = _lse_at(16 + delta, backend, "bf16x3")
        rel = float(((moved - base).abs() / base.abs()).max())
        assert rel <= 1e-4, f"{backend} bf16x3: lse moved by {rel:.3g} relative at delta {delta}"
        moved16 = _lse_at(16 + delta, backend, "bf16")
        worst16 = max(worst16, float(((moved16 - base16).abs() / base16.abs()).max()))
    # "bf16" rounds the rotated q/k once to bf16, as apply_rope then attention does
    assert worst16 > 1e-3, f"{backend} bf16: lse moved by only {worst16:.3g}"


def test_bf16x3_split_is_exercised_under_the_interpreter():
    """The Triton kernel really splits (hi/lo rounding happens): its bf16x3 lse differs from its
    fp32 lse (by the dropped lo.lo and residual, ~2^-16 of a score), far less than bf16's."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    a = _lse_at(1 << 20, "triton", "bf16x3")
    b = _lse_at(1 << 20, "triton", "fp32")
    c = _lse_at(1 << 20, "triton", "bf16")
    d3, d16 = float((a - b).abs().max()), float((c - b).abs().max())
    assert 0.0 < d3 < 1e-3 and d16 > 30 * d3, (d3, d16)


@pytest.mark.parametrize("bad, exc, match", [
    ("bf16x2", ValueError, "qk_precision must be one of"),
    (3, TypeError, "qk_precision must be a str"),
])
def test_bad_qk_precision_names_the_argument(bad, exc, match, monkeypatch):
    from posattn.kernels.triton import flash_attn

    calls = []
    monkeypatch.setattr(flash_attn, "attn_forward", lambda *a, **kw: calls.append(a))
    q, k, v = (x.detach() for x in _qkv(8, 2, 1, 16, torch.bfloat16, 0))
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(exc, match=match):
        posattn.anchor_attention(q, k, v, cu, rope=posattn.RopeSpec(16), positions=torch.arange(8, device=DEVICE),
                                 qk_precision=bad, backend=BACKENDS[-1])
    with pytest.raises(exc, match=match):
        posattn.attention.plan(q, k, cu, rope=posattn.RopeSpec(16), qk_precision=bad)
    assert not calls


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_planned_path_carries_qk_precision(backend):
    q, k, v = (x.detach() for x in _qkv(12, 2, 1, 32, torch.bfloat16, 1))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(12, device=DEVICE) + (1 << 22)
    spec = posattn.RopeSpec(32)
    p = posattn.attention.plan(q, k, cu, rope=spec, backend=backend, qk_precision="bf16x3")
    got = posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, plan=p, return_lse=True)
    want = posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, backend=backend,
                                    qk_precision="bf16x3", return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="qk_precision"):
        posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, plan=p, qk_precision="bf16")


def _grads_at(offset, backend, mode, D=64, T=16, H=2):
    g = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(torch.bfloat16).to(DEVICE) for _ in range(4))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(T, dtype=torch.int64, device=DEVICE) + offset
    out = posattn.anchor_attention(q, k, v, cu, num_anchors=0, rope=posattn.RopeSpec(D, base=5e5), positions=pos,
                                   backend=backend, qk_precision=mode)
    return [x.double().cpu() for x in torch.autograd.grad(out, (q, k), do)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gradients_keep_the_relative_position_property_with_bf16x3(backend):
    """dq and dk (w.r.t. the unrotated inputs) are the same at p and p + 2^20 in exact arithmetic.
    With "bf16x3" the backward's dS.k and dS^T.q products use the split too: one product of a
    rotated k rounded once to bf16 would move them by ~2^-9 relative (as "bf16" does)."""
    drift = {}
    for mode in ("bf16", "bf16x3"):
        a, b = _grads_at(16, backend, mode), _grads_at(16 + (1 << 20), backend, mode)
        drift[mode] = max(float((x - y).norm() / x.norm()) for x, y in zip(a, b))
    assert drift["bf16x3"] < 1e-3 and drift["bf16"] > 5 * drift["bf16x3"], drift

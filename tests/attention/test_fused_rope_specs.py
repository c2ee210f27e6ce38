"""Fused RoPE in anchor_attention for every spec (per-head frequency rows, mrope sections
including Qwen3-VL's interleaved ones, DPE with a query offset, float positions) against
apply_rope followed by attention without rope."""
import math

import pytest
import torch

import posattn
from posattn.kernels.triton import interpreting
from tests._tol import assert_within
from tests.attention import oracle
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("anchor_attention")


def _spec(kind, D, H):
    R = D if kind != "dpe" else D // 2
    if kind == "per_head":
        g = torch.Generator().manual_seed(5)
        inv = (torch.rand(H, R // 2, generator=g) * 0.5 + 1e-3).tolist()     # one row per k head
        return posattn.RopeSpec(D, scaling=posattn.Custom(inv))
    if kind == "mrope":                                                       # Qwen2-VL (sections in pairs)
        return posattn.RopeSpec(D, mrope_section=(R // 4, R // 8, R // 8), base=1e6)
    if kind == "mrope_interleaved":                                           # Qwen3-VL
        return posattn.RopeSpec(D, mrope_section=(R // 2 - 2 * (R // 8), R // 8, R // 8), mrope_interleaved=True)
    if kind == "dpe":                                                         # partial rotary, query offsets
        return posattn.RopeSpec(D, rotary_dim=R, dpe=posattn.DPE.for_window((0, R // 4, R // 2), (1.0, 4.0), 6))
    return posattn.RopeSpec(D, interleaved=True, base=5e5)                    # float positions


KINDS = ["per_head", "mrope", "mrope_interleaved", "dpe", "float_positions"]


def _positions(kind, spec, T):
    g = torch.Generator().manual_seed(11)
    if spec.n_axes > 1:
        t = torch.arange(T) + (1 << 20)
        return torch.stack((t, t // 3 + (1 << 12), t % 5)).to(torch.int64)   # [3, T]: time, height, width
    if kind == "float_positions":
        return torch.randint(0, 1 << 22, (T,), generator=g).to(torch.float32) * 0.25 + 0.125
    return torch.randint(0, 1 << 24, (T,), generator=g).to(torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bf16", "bf16x3"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_rope_equals_apply_rope_then_attention(backend, kind, mode):
    """fp32 inputs with "bf16" (fp32 products), bf16 inputs with "bf16x3"; the expected values are
    apply_rope (the reference backend, on fp32 copies) then attention, in fp64."""
    T, HQ, HK, D = 19, 4, 2, 32
    dtype = torch.float32 if mode == "bf16" else torch.bfloat16
    spec = _spec(kind, D, HK)
    pos = _positions(kind, spec, T)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype).to(DEVICE).requires_grad_(True) for h in (HQ, HK, HK))
    cu = torch.tensor([0, 7, 8, T], dtype=torch.int32)
    rows = torch.tensor([0, 8, T], dtype=torch.int32)
    out, lse = posattn.anchor_attention(q, k, v, cu.to(DEVICE), cu_rows=rows.to(DEVICE), rope=spec,
                                        positions=pos.to(DEVICE), return_lse=True, backend=backend,
                                        qk_precision=mode)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))

    # expected: apply_rope, then attention (fp64 on the rotated values)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_(True) for x in (q, k, v))
    qr, kr = posattn.apply_rope(q64, k64, pos, spec, layout="thd", backend="reference")
    mask = oracle.allowed_mask(T, cu.tolist(), rows.tolist(), 1, True, None)
    r_out, r_lse = oracle.attention(qr, kr, v64, mask, D ** -0.5)
    r_grads = torch.autograd.grad((r_out, r_lse), (q64, k64, v64), (dout.cpu().double(), dlse.cpu().double()))
    bnd = oracle.bounds(qr.detach(), kr.detach(), v64.detach(), mask, D ** -0.5, r_out.detach(), dout.cpu(),
                        dlse.cpu(), dtype, qk_eps=oracle.QK_EPS[mode])
    # gradients w.r.t. the unrotated q/k: |R^T e| <= |e_a| + |e_b| per pair (|cos|, |sin| <= 1)
    ones = torch.ones(T, spec.rotary_dim // 2, dtype=torch.float64)
    b_dq, b_dk = (oracle.rotate_bound(b, ones, ones, spec.rotary_dim, spec.interleaved) for b in bnd[2:4])
    what = f"{backend} {kind} {mode}"
    if dtype == torch.bfloat16 and backend == "triton" and interpreting():
        what += " (interpreter)"
    assert_within(out, r_out, bnd[0], what + " out")
    assert_within(lse, r_lse, bnd[1], what + " lse")
    for name, gr, r, b in zip("qkv", grads, r_grads, (b_dq, b_dk, bnd[4])):
        assert_within(gr, r, b, f"{what} d{name}")


def test_mrope_positions_shape_is_checked():
    spec = _spec("mrope", 32, 2)
    q = torch.randn(6, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"positions must be \[n_axes, T\] = \[3, 6\]"):
        posattn.anchor_attention(q, q, q, cu, rope=spec, positions=torch.arange(6, device=DEVICE))


def test_per_head_rows_must_divide_the_head_counts():
    spec = posattn.RopeSpec(16, scaling=posattn.Custom([[0.1 * (i + 1)] * 8 for i in range(3)]))
    q = torch.randn(6, 4, 16, device=DEVICE)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="per-head inv_freq has 3 rows"):
        posattn.anchor_attention(q, q, q, cu, rope=spec, positions=torch.arange(6, device=DEVICE))


def test_dpe_query_offset_gives_q_its_own_table():
    from posattn.rope.table import attention_tables

    spec = _spec("dpe", 32, 2)
    t = attention_tables(torch.arange(9), spec.tables("cpu"))
    assert t.shape == (2, 2, 1, 9, 8) and not torch.equal(t[0], t[1])
    assert math.isclose(float(t[1, 0, 0, 0, 0]), 1.0)          # key at position 0: angle 0


@pytest.mark.parametrize("kind", ["mrope_interleaved", "dpe"])
def test_compiles_fullgraph_with_inductor(kind):
    """torch.compile (inductor, fullgraph) of fused attention with a fresh non-plain spec in
    "bf16x3", against eager: the extra tables (pair axes, DPE scales and offsets) enter the op."""
    backend = "triton" if "triton" in BACKENDS else "reference"
    spec = _spec(kind, 32, 2)
    spec = posattn.RopeSpec(32, rotary_dim=spec.rotary_dim, base=7777.0, mrope_section=spec.mrope_section,
                            mrope_interleaved=spec.mrope_interleaved, dpe=spec.dpe)    # fresh: no cached tables
    T = 12
    pos = _positions(kind, spec, T).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, 2, 32, generator=g).bfloat16().to(DEVICE).requires_grad_(True) for _ in range(3))
    cu = torch.tensor([0, 5, T], dtype=torch.int32, device=DEVICE)

    def step(q, k, v, cu, pos):
        out, lse = posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, return_lse=True, backend=backend,
                                            qk_precision="bf16x3")
        return out.float().square().sum() + lse.sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(q, k, v, cu, pos)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss2 = step(q, k, v, cu, pos)
    grads2 = torch.autograd.grad(loss2, (q, k, v))
    # the same kernels on the same inputs; inductor may reassociate the fp32 sums around them
    torch.testing.assert_close(loss, loss2, atol=0, rtol=1e-6)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)

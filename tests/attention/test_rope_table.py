"""The per-call cos/sin table (posattn.rope.table) that fused attention reads, and the "one angle
everywhere" property: anchor_attention with rope equals apply_rope then anchor_attention."""
import math

import pytest
import torch

import posattn
from posattn.kernels.triton import interpreting
from posattn.rope.table import cos_sin_table
from tests._tol import assert_within
from tests.attention import oracle
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("anchor_attention")
TABLE_BACKENDS = [b for b in ("triton", "cpu", "reference") if b in BACKENDS]
TOP = 2 ** 31 - 1


def _positions(T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, TOP, (T,), generator=g, dtype=torch.int64)
    pos[0], pos[-1] = TOP, 0           # the extremes of the documented range
    if dtype == torch.float32:
        pos = (pos >> 8).to(torch.float32) * 0.75     # fractional float positions (exact in fp32)
    return pos.to(dtype)


@pytest.mark.parametrize("backend", TABLE_BACKENDS)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64, torch.float32])
def test_table_matches_exact_angles(backend, pos_dtype):
    """fp32 cos/sin within fp32 rounding of the exact (40-digit) values, positions up to 2^31 - 1."""
    T, spec = 37, posattn.RopeSpec(80, rotary_dim=40, scaling=posattn.YaRN(4.0, 64))   # attention_scaling != 1
    pos = _positions(T, pos_dtype)
    inv = spec.inv_freq()
    tab = cos_sin_table(pos.to(DEVICE), inv.to(DEVICE), spec.attention_scaling, backend=backend)
    assert tab.shape == (2, T, 20) and tab.dtype == torch.float32 and tab.device.type == DEVICE
    c, s = oracle.cos_sin(pos, inv, spec.attention_scaling)
    # the angle reduction is exact to ~1e-15 rad (a single fp64 reduction errs by up to 3e-7 rad at
    # 2^31). C++: fp64 sin/cos, one rounding to fp32 of a value below 1.2: 2^-24 * 1.2 (+ the fp32
    # attention_scaling). Triton: fp32 theta (2^-24 * pi), fp32 sin/cos (2 ulps) and the product's
    # rounding: 4e-7. The fp64 reference's reduction (kernels/reference/rope.py: torch.remainder by
    # an fp64 2*pi) is documented within 1e-7 rad at 2^31, plus the rounding: 1.7e-7
    budget = {"triton": 4e-7, "cpu": 1e-7, "reference": 1.7e-7}[backend]
    for got, want in ((tab[0], c), (tab[1], s)):
        assert_within(got, want, torch.full_like(want, budget), msg=f"{backend} {pos_dtype}")


@pytest.mark.parametrize("backend", [b for b in TABLE_BACKENDS if b != "reference"])
def test_table_holds_the_rotary_kernels_own_cos_sin(backend):
    """apply_rope of a one-hot head returns exactly the cos and sin it multiplies by: the table of
    the same backend must be bit-identical to them (one angle everywhere)."""
    T, D = 19, 32
    spec = posattn.RopeSpec(D, scaling=posattn.YaRN(4.0, 64))
    pos = _positions(T, torch.int64, seed=3).to(DEVICE)
    half = D // 2
    x = torch.zeros(T, 2, D, device=DEVICE)
    x[:, 0, :half] = 1.0          # head 0: x1 = 1, x2 = 0 -> (o1, o2) = (cos, sin)
    rot, _ = posattn.apply_rope(x, None, pos, spec, layout="thd", backend=backend)
    tab = cos_sin_table(pos, spec.inv_freq().to(DEVICE), spec.attention_scaling, backend=backend)
    assert torch.equal(rot[:, 0, :half], tab[0]) and torch.equal(rot[:, 0, half:], tab[1])


def test_table_bad_input():
    inv = posattn.RopeSpec(16).inv_freq()
    with pytest.raises(TypeError, match="positions must be int32"):
        cos_sin_table(torch.zeros(4, dtype=torch.float16), inv)
    with pytest.raises(ValueError, match="positions must be 1-D"):
        cos_sin_table(torch.zeros(2, 2, dtype=torch.int64), inv)
    with pytest.raises(TypeError, match="inv_freq must be a float32"):
        cos_sin_table(torch.zeros(4, dtype=torch.int64), inv.double())
    with pytest.raises(ValueError, match="backend must be one of"):
        cos_sin_table(torch.zeros(4, dtype=torch.int64), inv, backend="cuda")
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        cos_sin_table(torch.zeros(4, dtype=torch.int64), inv, out=torch.empty(2, 4, 3))
    assert cos_sin_table(torch.zeros(0, dtype=torch.int64), inv, backend="reference").shape == (2, 0, 8)


# ---------------------------------------------------------------------------
# anchor_attention(rope=spec) == apply_rope, then anchor_attention without rope


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_equals_apply_rope_then_attention_up_to_2_31(backend, dtype):
    T, HQ, HK, D = 24, 3, 1, 32
    spec = posattn.RopeSpec(D, rotary_dim=24, interleaved=True, scaling=posattn.YaRN(4.0, 64))
    cu = torch.tensor([0, 5, 11, 24], dtype=torch.int32, device=DEVICE)
    pos = _positions(T, torch.int64, seed=1).to(DEVICE)
    q, k, v = (torch.randn(T, h, D, device=DEVICE).to(dtype).requires_grad_(True) for h in (HQ, HK, HK))
    fused, lse = posattn.anchor_attention(q, k, v, cu, rope=spec, positions=pos, return_lse=True, backend=backend)
    dout = torch.randn_like(fused)
    g_fused = torch.autograd.grad(fused, (q, k, v), dout)

    qr, kr = posattn.apply_rope(q, k, pos, spec, layout="thd", backend=backend)
    plain, lse2 = posattn.anchor_attention(qr, kr, v, cu, return_lse=True, backend=backend)
    g_plain = torch.autograd.grad(plain, (q, k, v), dout)
    # both compute the same products from the same rounded rotated q/k (fp32: the same fp32
    # values); what may differ is the order of fp32 sums (three dots against one): fp32 rounding
    _, _, _, bnd = oracle.run(qr, kr, v, cu, None, 1, True, None, dout=dout, with_bounds=True)
    b32 = [b * (2.0 ** -24 / oracle.unit_roundoff(dtype)) if dtype != torch.float32 else b for b in bnd]
    what = f"{backend} {dtype}"
    assert_within(fused, plain, bnd[0] if dtype != torch.float32 else b32[0], msg=what + " out")
    assert_within(lse, lse2, bnd[1], msg=what + " lse")
    for name, a, b_, bound in zip("qkv", g_fused, g_plain, bnd[2:]):
        assert_within(a, b_, bound, msg=f"{what} d{name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_rope_reads_the_exact_angle_at_large_positions(backend):
    """Positions at the top of the range (2^31 - 16 .. 2^31 - 1) with the largest frequencies:
    fp32 attention with rope stays within the derived fp32 bound of the exact-angle oracle."""
    T, D = 16, 16
    spec = posattn.RopeSpec(D, base=10.0)          # inv_freq up to 1: the largest angles
    pos = torch.arange(TOP - T + 1, TOP + 1, dtype=torch.int64)
    cu = torch.tensor([0, T], dtype=torch.int32)
    q, k, v = (torch.randn(T, 1, D) for _ in range(3))
    out = posattn.anchor_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cu.to(DEVICE), rope=spec,
                                   positions=pos.to(DEVICE), backend=backend)
    r_out, _, _, bnd = oracle.run(q, k, v, cu, None, 1, True, None, rope=(pos, spec.inv_freq(), D, False, 1.0),
                                  with_bounds=True, bf16_truncates=backend == "triton" and interpreting())
    assert_within(out, r_out, bnd[0], msg=backend)
    assert math.isfinite(float(out.abs().max()))

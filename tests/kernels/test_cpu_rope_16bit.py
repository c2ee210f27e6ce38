"""The C++ CPU rotary kernel's fp16/bf16 bodies (csrc/cpu/rope_cpu_impl.inc: AVX2+F16C
loads and rounding stores, 8 values at a time, then a scalar tail), against the fp64
reference: every pair count around the vector width, both pairings, in and out of place,
and the values a rounding store must keep (NaN, inf, fp16 overflow, subnormals)."""
import pytest
import torch

import posattn
from posattn.kernels import cpu as cpu_kernels
from tests._tol import tol

pytestmark = pytest.mark.skipif(cpu_kernels._C is None, reason="posattn._C is not built")

DTYPES = [torch.float16, torch.bfloat16]


def _close(got, want, dtype):
    torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["split", "interleaved"])
@pytest.mark.parametrize("half", [1, 3, 4, 5, 7, 8, 9, 12, 16, 20, 64])
def test_every_pair_count(dtype, interleaved, half):
    R = 2 * half
    D = R + 6  # a pass-through tail after the rotary dims
    g = torch.Generator().manual_seed(half)
    q = torch.randn(2, 7, 3, D, generator=g).to(dtype)
    k = torch.randn(2, 7, 1, D, generator=g).to(dtype)
    pos = torch.randint(0, 5000, (7,), generator=g)
    spec = posattn.RopeSpec(D, rotary_dim=R, interleaved=interleaved)
    got = posattn.apply_rope(q, k, pos, spec, backend="cpu")
    want = posattn.apply_rope(q, k, pos, spec, backend="reference")
    for a, b, x in zip(got, want, (q, k)):
        _close(a, b, dtype)
        assert torch.equal(a[..., R:], x[..., R:])
    qi, ki = q.clone(), k.clone()
    posattn.apply_rope(qi, ki, pos, spec, backend="cpu", inplace=True)
    assert torch.equal(qi, got[0]) and torch.equal(ki, got[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["split", "interleaved"])
def test_special_values(dtype, interleaved):
    D = 32  # 16 pairs: two full vectors (split) / four (interleaved)
    spec = posattn.RopeSpec(D, interleaved=interleaved)
    pos = torch.tensor([0, 1, 2, 3])  # pair 0 turns by `pos` radians (inv_freq 1)
    big = 6.0e4 if dtype == torch.float16 else 3.0e38
    tiny = 1.0e-6 if dtype == torch.float16 else 1.0e-39  # subnormal in the dtype
    q = torch.randn(1, 4, 2, D, dtype=torch.float64)
    a, b = (0, 1) if interleaved else (0, D // 2)  # the two members of pair 0
    q[0, 0, 0, 5] = float("nan")
    q[0, 1, 0, 3] = float("inf")
    q[0, 2, 0, 9] = -float("inf")
    q[0, 1, 1, a], q[0, 1, 1, b] = big, -big      # rotated a = big * (cos 1 + sin 1) overflows
    q[0, 3, 1, 6:10] = tiny
    q[0, 2, 1, a], q[0, 2, 1, b] = tiny, tiny
    q = q.to(dtype)
    got, _ = posattn.apply_rope(q, None, pos, spec, backend="cpu")
    want, _ = posattn.apply_rope(q, None, pos, spec, backend="reference")
    assert torch.equal(got.isnan(), want.isnan())
    assert got[0, 1, 1, a] == float("inf") and torch.isfinite(got[0, 1, 1, b])
    finite = ~(want.isnan() | want.isinf())
    _close(got[finite], want[finite], dtype)
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])  # infinities, signs included


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["split", "interleaved"])
def test_rounds_to_nearest_even_like_the_fp32_kernel(dtype, interleaved):
    """The 16-bit kernel computes in fp32 and rounds once: its output is the fp32 kernel's
    output on the widened input, rounded to nearest even (torch's .to). The two bodies may
    fuse a multiply-add differently, which can move a result across a rounding boundary in
    rare elements by one ulp; truncating or double-rounding stores would miss in about half."""
    g = torch.Generator().manual_seed(7)
    spec = posattn.RopeSpec(128, rotary_dim=120, interleaved=interleaved)
    q = torch.randn(2, 64, 4, 128, generator=g).to(dtype)
    pos = torch.randint(0, 100000, (64,), generator=g)
    got, _ = posattn.apply_rope(q, None, pos, spec, backend="cpu")
    want = posattn.apply_rope(q.float(), None, pos, spec, backend="cpu")[0].to(dtype)
    diff = got != want
    assert diff.sum().item() <= q.numel() // 10000, f"{diff.sum().item()} of {q.numel()} differ"
    if diff.any():
        ulp = torch.finfo(dtype).eps * want[diff].double().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got[diff].double() - want[diff].double()).abs() <= ulp).all()


# ---------------------------------------------------------------------------
# the cos/sin-table kernel's bodies (csrc/cpu/rope_cos_sin_cpu_impl.inc)

def _tables(S, half, form, g, dtype=torch.float32):
    ang = torch.rand(S, half, generator=g, dtype=torch.float64) * 6
    if form == "full":  # transformers' duplicated halves, perturbed so that c1 != c2, s1 != s2
        return (torch.cat([ang.cos(), ang.cos() * 0.9], -1).to(dtype),
                torch.cat([ang.sin(), ang.sin() * 1.1], -1).to(dtype))
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["split", "interleaved"])
@pytest.mark.parametrize("form", ["half", "full"])
@pytest.mark.parametrize("half", [1, 3, 4, 5, 8, 9, 12, 20, 64])
def test_cos_sin_every_pair_count(dtype, interleaved, form, half):
    R, S = 2 * half, 7
    D = R + 6
    g = torch.Generator().manual_seed(half)
    q = torch.randn(2, S, 3, D, generator=g).to(dtype)
    k = torch.randn(2, S, 1, D, generator=g).to(dtype)
    cos, sin = _tables(S, half, form, g)
    kw = {"interleaved": interleaved, "rotary_dim": R}  # R: a narrow full-width table is ambiguous without it
    got = posattn.apply_rope_cos_sin(q, k, cos, sin, backend="cpu", **kw)
    want = posattn.apply_rope_cos_sin(q, k, cos, sin, backend="reference", **kw)
    for a, b, x in zip(got, want, (q, k)):
        _close(a, b, dtype)
        assert torch.equal(a[..., R:], x[..., R:])
    qi, ki = q.clone(), k.clone()
    posattn.apply_rope_cos_sin(qi, ki, cos, sin, inplace=True, backend="cpu", **kw)
    assert torch.equal(qi, got[0]) and torch.equal(ki, got[1])
    # one rounding of the fp32 kernel's result (same fp32 multiply-adds)
    q32 = posattn.apply_rope_cos_sin(q.float(), None, cos, sin, backend="cpu", **kw)[0]
    assert (got[0] != q32.to(dtype)).sum().item() <= max(1, q.numel() // 10000)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["split", "interleaved"])
def test_cos_sin_special_values(dtype, interleaved):
    D, S = 32, 4
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, S, 2, D, generator=g, dtype=torch.float64)
    q[0, 0, 0, 5] = float("nan")
    q[0, 1, 0, 3] = float("inf")
    q = q.to(dtype)
    cache = torch.randn(8, D, generator=g)
    pos = torch.tensor([0, 1, 9, 2])  # 9 is outside the cache: that token's rotated dims are NaN
    got, _ = posattn.apply_rope_cos_sin(q, None, cos_sin_cache=cache, positions=pos, interleaved=interleaved,
                                        check_bounds=False, backend="cpu")
    assert got[0, 2].isnan().all()
    ok = pos != 9
    want, _ = posattn.apply_rope_cos_sin(q[:, ok], None, cos_sin_cache=cache, positions=pos[ok],
                                         interleaved=interleaved, backend="reference")
    g_ok = got[:, ok]
    assert torch.equal(g_ok.isnan(), want.isnan()) and torch.equal(g_ok.isinf(), want.isinf())
    finite = want.isfinite()
    _close(g_ok[finite], want[finite], dtype)

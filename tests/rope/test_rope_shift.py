"""rope_shift: re-rotating cached keys by a position delta equals applying RoPE at
the shifted positions (Positional Integrity Encoding)."""
import pytest
import torch

import posattn
from posattn.rope.ops import rope_shift
from tests._tol import assert_close, tol
from tests.conftest import DEVICE, usable_backends
from tests.rope import _rope_helpers as H

BACKENDS = usable_backends("rope")


def _deltas(kind, B, S, n_axes):
    yield 7
    yield -3
    yield 2.5
    yield torch.tensor(-11, device=DEVICE)
    yield torch.randint(-50, 50, (B, S), device=DEVICE)
    yield torch.randint(-50, 50, (S,), device=DEVICE).to(torch.int32)
    yield torch.rand(S, device=DEVICE) * 8 - 4  # float per-token deltas
    if n_axes > 1:
        yield torch.randint(-9, 9, (n_axes, S), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "scaled", "mrope", "perhead", "dpe"])
def test_shift_equals_reapply(backend, kind):
    spec = H.TableSpec(48, rotary_dim=32, interleaved=kind == "perhead", fixed=H.make_tables(kind, 32, 2))
    B, S = 2, 3
    q, k = H.rand_qk("bshd", B, S, 2, 2, 48, torch.float32, DEVICE)
    pos = H.positions_for(spec.fixed.n_axes, "bshd", B, S, torch.int64, DEVICE, batched=True, max_pos=1000)
    _, k_rot = posattn.apply_rope(q, k, pos, spec, backend="reference")
    for delta in _deltas(kind, B, S, spec.fixed.n_axes):
        d = delta
        if isinstance(d, torch.Tensor) and spec.fixed.n_axes > 1 and d.dim() == 2 and d.shape[0] == 3:
            d = d[:, None, :]  # per-axis [n_axes, S] against positions [n_axes, B, S]
        # fp64 so that a fractional delta is not rounded away (fp32 holds 1000.3 only to 6e-5)
        new_pos = pos.double() + (d.double() if isinstance(d, torch.Tensor) else d)
        _, want = H.oracle(q, k, new_pos, spec)
        got = rope_shift(k_rot, delta, spec, positions=pos, backend=backend)
        assert got.shape == k.shape
        assert_close(got, want, torch.float32, msg=f"{kind} delta={delta}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_layouts_and_inplace(backend, layout):
    spec = posattn.RopeSpec(64, rotary_dim=48)
    q, k = H.rand_qk(layout, 1, 4, 2, 2, 64, torch.float32, DEVICE)
    pos = torch.arange(4, device=DEVICE) + 100
    _, k_rot = posattn.apply_rope(q, k, pos, spec, layout=layout, backend="reference")
    delta = torch.tensor([-1, 5, 0, 1000], device=DEVICE)
    _, want = posattn.apply_rope(q, k, pos + delta, spec, layout=layout, backend="reference")
    got = rope_shift(k_rot, delta, spec, layout=layout, backend=backend)
    assert_close(got, want, torch.float32)
    kk = k_rot.clone()
    out = rope_shift(kk, delta, spec, layout=layout, inplace=True, backend=backend)
    assert out is kk
    assert_close(kk, want, torch.float32)
    assert torch.equal(kk[..., 48:], k_rot[..., 48:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpe_inplace(backend):
    spec = H.TableSpec(32, fixed=H.make_tables("dpe", 32))
    q, k = H.rand_qk("bshd", 1, 3, 1, 2, 32, torch.bfloat16, DEVICE)
    pos = torch.tensor([3, 40, 41], device=DEVICE)
    _, k_rot = posattn.apply_rope(q, k, pos, spec, backend="reference")
    kk = k_rot.clone()
    rope_shift(kk, -2, spec, positions=pos, inplace=True, backend=backend)
    _, want = H.oracle(q, k, pos - 2, spec)
    # two roundings to bf16 (the undo and the redo), so twice the one-rounding budget
    budget = {name: 2 * v for name, v in tol(torch.bfloat16).items()}
    torch.testing.assert_close(kk.double().cpu(), want, **budget)


@pytest.mark.parametrize("case, exc, match", [
    ("dpe_no_positions", ValueError, "positions is required by rope_shift for this spec"),
    ("delta_type", TypeError, "delta must be an int, a float or a tensor"),
    ("delta_dtype", TypeError, "delta must be int32, int64, float32 or float64"),
    ("delta_shape", ValueError, r"delta of shape \[S\] must have S = 3"),
    ("k_rank", ValueError, "k must be 4-D"),
    ("spec_dim", ValueError, r"k's head_dim \(32\) must equal spec.head_dim \(64\)"),
    ("positions_rank", ValueError, "positions must be"),
])
def test_bad_inputs(case, exc, match):
    spec = posattn.RopeSpec(32)
    k = torch.randn(2, 3, 2, 32)
    delta, kw = 1, {}
    if case == "dpe_no_positions":
        spec = H.TableSpec(32, fixed=H.make_tables("dpe", 32))
    elif case == "delta_type":
        delta = [1, 2, 3]
    elif case == "delta_dtype":
        delta = torch.ones(3, dtype=torch.float16)
    elif case == "delta_shape":
        delta = torch.ones(4, dtype=torch.long)
    elif case == "k_rank":
        k = torch.randn(3, 2, 32)
    elif case == "spec_dim":
        spec = posattn.RopeSpec(64)
    elif case == "positions_rank":
        spec = H.TableSpec(32, fixed=H.make_tables("dpe", 32))
        kw["positions"] = torch.zeros(2, 3, 1, dtype=torch.long)
    with pytest.raises(exc, match=match):
        rope_shift(k, delta, spec, **kw)

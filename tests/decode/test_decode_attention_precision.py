"""decode_attention's qk_precision (issue 15): RoPE's relative property in bf16.

The same q/k/v content placed at positions p and p + Delta (Delta up to 2^24) must give lse that
differs by at most 1e-4 relative with "bf16x3" on every backend (the C++ path computes in fp32
in every mode); with "bf16" (the rotated q/k rounded once to bf16) the Triton kernel's spread is
measured too and must be far larger, so that the test shows it measures something.
"""
import pytest
import torch

import posattn
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.decode._oracle import Case

BACKENDS = usable_backends("decode_attention")
DELTAS = [2 ** e for e in (4, 10, 16, 20, 24)]


def _problem():
    g = torch.Generator().manual_seed(0)
    D, S, L = 128, 64, 48
    q = (torch.randn(1, 1, 8, D, generator=g) * 2.0).bfloat16()      # |score| ~ 4 (issue 15's setting)
    kc = (torch.randn(1, S, 2, D, generator=g) * 2.0).bfloat16()
    vc = torch.randn(1, S, 2, D, generator=g).bfloat16()
    cs = torch.tensor([L], dtype=torch.int32)
    return [x.to(DEVICE) for x in (q, kc, vc, cs)]


def lse_spread(backend: str, qk: str) -> float:
    """max over Delta of |lse(p + Delta) - lse(p)| / |lse(p)|, p = 16, pre-RoPE cache."""
    q, kc, vc, cs = _problem()
    spec = posattn.RopeSpec(128, base=5e5)

    def lse_at(p0):
        kp = (p0 + torch.arange(kc.shape[1], dtype=torch.int64)).to(DEVICE)
        return posattn.decode_attention(q, kc, vc, cs, rope=spec, key_positions=kp, qk_precision=qk,
                                        return_lse=True, backend=backend)[1].double().cpu()

    base = lse_at(16)
    return max(float(((lse_at(16 + d) - base).abs() / base.abs()).max()) for d in DELTAS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16x3_keeps_relativity(backend):
    spread = lse_spread(backend, "bf16x3")
    assert spread <= 1e-4, f"{backend}: lse moves by {spread:.3g} relative between p and p + Delta"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("cpu", "reference")])
def test_bf16_contrast(backend):
    """The rounded mode breaks relativity measurably (fp32 / fp64 backends do not round: not here)."""
    x3 = lse_spread(backend, "bf16x3")
    b16 = lse_spread(backend, "bf16")
    assert b16 > 1e-4 and b16 > 20 * x3, f"bf16 spread {b16:.3g} vs bf16x3 {x3:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qk", ["bf16x3", "fp32"])
def test_qk_precision_over_rotated_cache(qk, backend):
    """Without key_positions (a rotated cache), qk_precision applies to q: the result matches the
    oracle (which rounds the rotated q once to the dtype: within the dtype's tolerance)."""
    case = Case(q_lens=[2, 1], cached=[9, 4], page_size=4, dtype=torch.bfloat16, append=True,
                rope=posattn.RopeSpec(16, rotary_dim=12), device=DEVICE, seed=11)
    args, kw = case.args()
    out, lse = posattn.decode_attention(*args, **kw, qk_precision=qk, return_lse=True, backend=backend)
    ref_out, ref_lse, ref_kc, _ = case.oracle()
    assert_close(out.reshape(ref_out.shape), ref_out, torch.bfloat16, "attention", msg="out")
    assert_close(lse.reshape(ref_lse.shape), ref_lse, torch.bfloat16, "attention", msg="lse")
    assert_close(args[1], ref_kc, torch.bfloat16, "elementwise", msg="the new keys are written rotated")

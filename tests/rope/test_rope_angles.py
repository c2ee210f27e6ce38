"""apply_rope_angles: explicit (network-produced) phases, differentiable in q, k and angles."""
import pytest
import torch

import posattn
from posattn.rope.ops import apply_rope_angles
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.rope import _rope_helpers as H

BACKENDS = usable_backends("rope_angles")


def _oracle(q, k, angles, layout, rotary_dim, interleaved):
    a4 = angles.unsqueeze(0) if angles.dim() == 3 else angles
    qo = H.from_bshd(H.oracle_rotate(H.to_bshd(q, layout).cpu(), a4.cpu(), rotary_dim, interleaved), layout)
    ko = None if k is None else H.from_bshd(
        H.oracle_rotate(H.to_bshd(k, layout).cpu(), a4.cpu(), rotary_dim, interleaved), layout)
    return qo, ko


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # layout, B, S, HQ, HK, D, rotary_dim, angle rows, batch-shared angles, interleaved
    ("bshd", 2, 3, 4, 2, 80, 64, 1, False, False),
    ("bshd", 1, 2, 4, 2, 96, 48, 2, True, True),     # one phase per GQA group
    ("bhsd", 2, 2, 3, 3, 64, 64, 3, False, False),   # one phase per head
    ("thd", 1, 3, 3, 0, 80, 80, 1, True, True),      # packed, no k
], ids=lambda c: "-".join(map(str, c)))
def test_matches_oracle(backend, dtype, case):
    layout, B, S, HQ, HK, D, R, rows, shared, inter = case
    q, k = H.rand_qk(layout, B, S, HQ, HK, D, dtype, DEVICE)
    shape = (S, rows, R // 2) if shared or layout == "thd" else (B, S, rows, R // 2)
    angles = torch.randn(shape, device=DEVICE) * 50
    qo, ko = apply_rope_angles(q, k, angles, interleaved=inter, layout=layout, backend=backend)
    rq, rk = _oracle(q, k, angles, layout, R, inter)
    assert qo.shape == q.shape and qo.dtype == dtype
    assert_close(qo, rq, dtype)
    if k is None:
        assert ko is None
    else:
        assert_close(ko, rk, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_apply_rope_at_position_angles(backend):
    spec = posattn.RopeSpec(64)
    q, k = H.rand_qk("bshd", 1, 4, 2, 1, 64, torch.float32, DEVICE)
    pos = torch.tensor([0, 5, 17, 300], device=DEVICE)
    # reduced in fp64 first: an fp32 angle of ~300 rad is itself 1.5e-5 rad off
    ang = torch.remainder(pos.double()[:, None] * spec.inv_freq().double().to(DEVICE), 2 * torch.pi)
    ang = ang.float()[:, None, :]
    a = apply_rope_angles(q, k, ang, backend=backend)
    b = posattn.apply_rope(q, k, pos, spec, backend="reference")
    assert_close(a[0], b[0], torch.float32)
    assert_close(a[1], b[1], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend):
    q, k = H.rand_qk("bshd", 1, 3, 2, 1, 48, torch.float32, DEVICE)
    ang = torch.randn(3, 1, 16, device=DEVICE)
    want = apply_rope_angles(q, k, ang, backend="reference")
    qo, ko = apply_rope_angles(q, k, ang, inplace=True, backend=backend)
    assert qo is q and ko is k
    assert_close(q, want[0], torch.float32)
    assert_close(k, want[1], torch.float32)


def test_gradcheck_fp64_reference():
    """Backward of the custom op (q, k and angles) against numerical differentiation."""
    q, k = H.rand_qk("bshd", 2, 2, 2, 1, 10, torch.float64, "cpu")
    for rows, shared in ((1, True), (1, False)):
        shape = (2, rows, 4) if shared else (2, 2, rows, 4)
        ang = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b, c: apply_rope_angles(a, b, c, interleaved=True, backend="reference"), (qq, kk, ang))
    q3 = torch.randn(1, 2, 4, 10, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(1, 2, 2, 5, dtype=torch.float64, requires_grad=True)  # per GQA group
    assert torch.autograd.gradcheck(lambda a, c: apply_rope_angles(a, None, c, backend="reference")[0], (q3, ang))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, shared", [(1, True), (2, False)])
def test_backend_grads_match_oracle(backend, rows, shared):
    q, k = H.rand_qk("bshd", 2, 3, 4, 2, 40, torch.float32, DEVICE)
    shape = (3, rows, 16) if shared else (2, 3, rows, 16)
    ang = (torch.randn(shape, device=DEVICE) * 3).requires_grad_()
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = apply_rope_angles(q, k, ang, backend=backend)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q2, k2 = q.detach().cpu().double().requires_grad_(), k.detach().cpu().double().requires_grad_()
    a2 = ang.detach().cpu().double().requires_grad_()
    rq, rk = _oracle(q2, k2, a2, "bshd", 32, False)
    torch.autograd.backward((rq, rk), (gq.cpu().double(), gk.cpu().double()))
    assert_close(q.grad, q2.grad, torch.float32)
    assert_close(k.grad, k2.grad, torch.float32)
    # the angle gradient sums over heads, pairs' magnitudes and (when shared) the batch
    torch.testing.assert_close(ang.grad.double().cpu(), a2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case, exc, match", [
    ("rank", ValueError, r"angles must be \[B, S, Ha, R/2\] or \[S, Ha, R/2\]"),
    ("seq", ValueError, "angles must be .* with S = 3"),
    ("batch", ValueError, "B = 2"),
    ("too_wide", ValueError, r"angles' last dimension \(R/2 = 40\) must be in \[1, head_dim/2 = 32\]"),
    ("rows", ValueError, r"angles' head dimension \(3\) must be 1 or divide"),
    ("dtype", TypeError, "angles must be float32"),
    ("not_tensor", TypeError, "angles must be a torch.Tensor"),
    ("interleaved", TypeError, "interleaved must be a bool"),
])
def test_bad_inputs(case, exc, match):
    q, k = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 2, 64)
    ang = torch.randn(2, 3, 1, 16)
    kw = {}
    if case == "rank":
        ang = torch.randn(3, 16)
    elif case == "seq":
        ang = torch.randn(2, 4, 1, 16)
    elif case == "batch":
        ang = torch.randn(3, 3, 1, 16)
    elif case == "too_wide":
        ang = torch.randn(2, 3, 1, 40)
    elif case == "rows":
        ang = torch.randn(2, 3, 3, 16)
    elif case == "dtype":
        ang = ang.half()
    elif case == "not_tensor":
        ang = ang.tolist()
    elif case == "interleaved":
        kw["interleaved"] = 1
    with pytest.raises(exc, match=match):
        apply_rope_angles(q, k, ang, **kw)

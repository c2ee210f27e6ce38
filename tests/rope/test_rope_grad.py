"""apply_rope gradients: gradcheck (fp64) of the custom op's backward, every backend's
gradients against autograd through an independent fp64 oracle, torch.compile, in place."""
import pytest
import torch

import posattn
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.rope import _rope_helpers as H

BACKENDS = usable_backends("rope")
KINDS = ("plain", "scaled", "mrope", "perhead", "dpe")


def _spec(kind, interleaved=False, head_dim=40, rotary_dim=32):
    return H.TableSpec(head_dim, rotary_dim=rotary_dim, interleaved=interleaved,
                       fixed=H.make_tables(kind, rotary_dim, 2))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu", "cuda")])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(backend, kind):
    """The registered backward (same kernel at -theta, DPE offset on the query) is the true gradient."""
    spec = _spec(kind, interleaved=kind == "perhead", head_dim=14, rotary_dim=12)
    q, k = H.rand_qk("bshd", 2, 2, 2, 2, 14, torch.float64, DEVICE)
    pos = H.positions_for(spec.fixed.n_axes, "bshd", 2, 2, torch.int64, DEVICE, batched=True, max_pos=50)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: posattn.apply_rope(a, b, pos, spec, backend=backend),
                                    (q, k), eps=1e-6, atol=1e-8)


def test_gradcheck_oracle_fp64():
    """The oracle the backends are compared against differentiates correctly itself."""
    spec = _spec("dpe", head_dim=14, rotary_dim=12)
    q, k = H.rand_qk("bshd", 1, 2, 2, 2, 14, torch.float64, "cpu")
    pos = H.positions_for(1, "bshd", 1, 2, torch.int64, "cpu", batched=True, max_pos=50)
    assert torch.autograd.gradcheck(lambda a, b: H.oracle(a, b, pos, spec),
                                    (q.requires_grad_(), k.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_backend_grads_match_oracle(backend, kind, layout):
    spec = _spec(kind, interleaved=layout == "bhsd")
    q, k = H.rand_qk(layout, 2, 3, 4, 2, 40, torch.float32, DEVICE)
    pos = H.positions_for(spec.fixed.n_axes, layout, 2, 3, torch.float32 if kind == "mrope" else torch.int64,
                          DEVICE, batched=True)
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout, backend=backend)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    q2, k2 = q.detach().cpu().double().requires_grad_(), k.detach().cpu().double().requires_grad_()
    rq, rk = H.oracle(q2, k2, pos, spec, layout)
    torch.autograd.backward((rq, rk), (gq.cpu().double(), gk.cpu().double()))
    assert_close(q.grad, q2.grad, torch.float32)
    assert_close(k.grad, k2.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_sum_and_k_none(backend):
    """Expanded (stride-0) output gradients, and k=None."""
    spec = posattn.RopeSpec(32)
    q = torch.randn(1, 3, 2, 32, device=DEVICE, requires_grad=True)
    pos = torch.arange(3, device=DEVICE)
    qo, ko = posattn.apply_rope(q, None, pos, spec, backend=backend)
    assert ko is None
    qo.sum().backward()
    q2 = q.detach().cpu().double().requires_grad_()
    H.oracle(q2, None, pos, spec)[0].sum().backward()
    assert_close(q.grad, q2.grad, torch.float32)


def test_torch_compile_fullgraph():
    spec = H.TableSpec(32, fixed=H.make_tables("dpe", 32))
    backend = "cpu" if DEVICE == "cpu" else None

    def f(q, k, pos):
        qo, ko = posattn.apply_rope(q, k, pos, spec, backend=backend)
        return (qo * qo).sum() + (ko * 2).sum()

    q, k = H.rand_qk("bshd", 2, 3, 2, 1, 32, torch.float32, DEVICE)
    pos = torch.arange(3, device=DEVICE)
    cf = torch.compile(f, fullgraph=True)  # inductor, the default backend
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    cf(q1, k1, pos).backward()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    f(q2, k2, pos).backward()
    assert_close(q1.grad, q2.grad, torch.float32)
    assert_close(k1.grad, k2.grad, torch.float32)


def test_inplace_with_grad_behaves_like_torch_inplace_ops():
    spec = posattn.RopeSpec(32)
    pos = torch.arange(3, device=DEVICE)
    leaf = torch.randn(1, 3, 2, 32, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        posattn.apply_rope(leaf, None, pos, spec, inplace=True)
    # a non-leaf rotated in place gets the same gradient as the out-of-place op
    x = torch.randn(1, 3, 2, 32, device=DEVICE, requires_grad=True)
    y = x * 1.0
    out, _ = posattn.apply_rope(y, None, pos, spec, inplace=True)
    assert out is y
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    o2, _ = posattn.apply_rope(x2, None, pos, spec)
    o2.backward(g)
    assert_close(x.grad, x2.grad, torch.float32)
    assert_close(y.detach(), o2.detach(), torch.float32)


def test_torch_compile_angles_inplace_and_shift():
    """apply_rope_angles (with gradients to angles), in-place apply_rope (the mutating
    custom op) and rope_shift all trace with fullgraph=True under inductor (the default
    backend), compiled before any eager call with their spec (a base no other test uses)."""
    backend = "cpu" if DEVICE == "cpu" else None
    spec = posattn.RopeSpec(32, base=12289.0)

    def f(q, k, ang):
        qo, ko = posattn.apply_rope_angles(q, k, ang, backend=backend)
        return (qo * qo).sum() + ko.sum()

    q = torch.randn(1, 3, 2, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 3, 1, 32, device=DEVICE, requires_grad=True)
    ang = torch.randn(3, 1, 16, device=DEVICE, requires_grad=True)
    torch.compile(f, fullgraph=True)(q, k, ang).backward()
    got = (q.grad.clone(), k.grad.clone(), ang.grad.clone())
    q.grad = k.grad = ang.grad = None
    f(q, k, ang).backward()
    for a, b in zip(got, (q.grad, k.grad, ang.grad)):
        assert_close(a, b, torch.float32)

    def h(q, k, pos):
        posattn.apply_rope(q, k, pos, spec, inplace=True, backend=backend)
        return q * 2, posattn.rope_shift(k, 5, spec, backend=backend)

    q2, k2 = torch.randn(1, 3, 2, 32, device=DEVICE), torch.randn(1, 3, 1, 32, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    out_q, out_k = torch.compile(h, fullgraph=True)(q2.clone(), k2.clone(), pos)
    rq, rk = posattn.apply_rope(q2, k2, pos, spec, backend=backend)
    assert_close(out_q, rq * 2, torch.float32)
    assert_close(out_k, posattn.rope_shift(rk, 5, spec, backend=backend), torch.float32)

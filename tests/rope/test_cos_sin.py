"""apply_rope_cos_sin on every usable backend against an fp64 oracle.

The oracle is written transformers-style (``x * cos + rotate_half(x) * sin``
on full-width [.., R] tables), independently of the kernels' pairwise form.
"""
import pytest
import torch

import posattn
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("rope_cos_sin")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def to_full(t, interleaved):
    """[.., R/2] table -> the duplicated [.., R] form."""
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)


def oracle(x4, cos_full, sin_full, interleaved):
    """x4 [B, S, H, D]; cos_full/sin_full [B or 1, S, R] per token -> fp64 [B, S, H, D]."""
    x = x4.detach().double().cpu()
    c = cos_full.double().cpu()[:, :, None, :]
    s = sin_full.double().cpu()[:, :, None, :]
    R = c.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        rh = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        rh = torch.cat((-rot[..., R // 2:], rot[..., :R // 2]), dim=-1)
    return torch.cat((rot * c + rh * s, rest), dim=-1)


def to4(x, layout):
    return {"bshd": x, "bhsd": x.transpose(1, 2), "thd": x.unsqueeze(0)}[layout]


def make_qk(layout, B, S, HQ, HK, D, dtype):
    if layout == "thd":
        q = torch.randn(B * S, HQ, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B * S, HK, D, dtype=dtype, device=DEVICE) if HK else None
    elif layout == "bshd":
        q = torch.randn(B, S, HQ, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B, S, HK, D, dtype=dtype, device=DEVICE) if HK else None
    else:
        q = torch.randn(B, HQ, S, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B, HK, S, D, dtype=dtype, device=DEVICE) if HK else None
    return q, k


def angles(*shape_and_half, max_pos=4096):
    *lead, half = shape_and_half
    pos = torch.randint(0, max_pos, tuple(lead), dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / (2 * half)))
    return pos[..., None] * inv


SHAPES = [
    # B, S, HQ, HK, D, R
    (1, 7, 3, 1, 80, 80),
    (2, 7, 3, 3, 96, 48),
    (2, 5, 4, 2, 64, 64),
    (3, 4, 2, 0, 96, 96),  # no k
    (1, 9, 5, 2, 80, 20),
]


def shapes_for(backend):
    """The Triton interpreter runs each program in Python: two shapes there, all five elsewhere."""
    return SHAPES[:2] if backend == "triton" and DEVICE == "cpu" else SHAPES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_per_token_tables(backend, dtype, layout, interleaved):
    """[S, R/2], [B, S, R/2] and [1, S, R/2] tables, in several table dtypes."""
    tdtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    for i, (B, S, HQ, HK, D, R) in enumerate(shapes_for(backend)):
        q, k = make_qk(layout, B, S, HQ, HK, D, dtype)
        Bq = 1 if layout == "thd" else B
        Sq = B * S if layout == "thd" else S
        tdt = tdtypes[i % len(tdtypes)]
        lead = [(Sq,), (Bq, Sq), (1, Sq)][i % 3]
        ang = angles(*lead, R // 2)
        cos, sin = ang.cos().to(tdt).to(DEVICE), ang.sin().to(tdt).to(DEVICE)
        qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, layout=layout, interleaved=interleaved, backend=backend)
        c3 = cos if cos.dim() == 3 else cos[None]
        s3 = sin if sin.dim() == 3 else sin[None]
        cf, sf = to_full(c3, interleaved), to_full(s3, interleaved)
        assert qo.dtype == dtype and qo.shape == q.shape
        assert_close(to4(qo, layout), oracle(to4(q, layout), cf, sf, interleaved), dtype, msg=f"q {SHAPES[i]} {tdt}")
        if k is not None:
            assert_close(to4(ko, layout), oracle(to4(k, layout), cf, sf, interleaved), dtype, msg=f"k {SHAPES[i]}")
        else:
            assert ko is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_full_width_tables_applied_exactly(backend, interleaved):
    """The [.., R] form is applied like transformers' formula even when its halves differ."""
    B, S, H, D, R = 2, 5, 3, 96, 64
    q, k = make_qk("bshd", B, S, H, 2, D, torch.float32)
    cos = torch.randn(B, S, R, device=DEVICE)
    sin = torch.randn(B, S, R, device=DEVICE)
    qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, rotary_dim=R, interleaved=interleaved, backend=backend)
    assert_close(qo, oracle(q, cos, sin, interleaved), torch.float32)
    assert_close(ko, oracle(k, cos, sin, interleaved), torch.float32)
    # the default reading of a width-D table is the full form
    cos_d, sin_d = torch.randn(1, S, D, device=DEVICE), torch.randn(1, S, D, device=DEVICE)
    qo, _ = posattn.apply_rope_cos_sin(q, None, cos_d, sin_d, interleaved=interleaved, backend=backend)
    assert_close(qo, oracle(q, cos_d, sin_d, interleaved), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_cache_indexed_by_positions(backend, dtype, layout):
    N = 50
    for i, (B, S, HQ, HK, D, R) in enumerate(shapes_for(backend)):
        interleaved = i % 2 == 1
        q, k = make_qk(layout, B, S, HQ, HK, D, dtype)
        ang = angles(N, R // 2)
        tdt = [torch.float32, torch.bfloat16][i % 2]
        cos, sin = ang.cos().to(tdt).to(DEVICE), ang.sin().to(tdt).to(DEVICE)
        pdt = torch.int32 if i % 2 else torch.int64
        if layout == "thd":
            pos = torch.randint(0, N, (B * S,), dtype=pdt, device=DEVICE)
            rows = pos[None].long().cpu()
        elif i % 3 == 0:
            pos = torch.randint(0, N, (S,), dtype=pdt, device=DEVICE)
            rows = pos[None].long().cpu()
        else:
            pos = torch.randint(0, N, (B, S), dtype=pdt, device=DEVICE)
            rows = pos.long().cpu()
        qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, positions=pos, layout=layout, interleaved=interleaved,
                                            backend=backend)
        cf = to_full(cos.cpu()[rows], interleaved)
        sf = to_full(sin.cpu()[rows], interleaved)
        assert_close(to4(qo, layout), oracle(to4(q, layout), cf, sf, interleaved), dtype, msg=str(SHAPES[i]))
        if k is not None:
            assert_close(to4(ko, layout), oracle(to4(k, layout), cf, sf, interleaved), dtype)
        # the same rows as one vLLM-style cos_sin_cache
        cache = torch.cat((cos, sin), dim=-1)
        qo2, ko2 = posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos, layout=layout,
                                              interleaved=interleaved, backend=backend)
        assert torch.equal(qo2, qo)
        if k is not None:
            assert torch.equal(ko2, ko)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_cache(backend):
    """A per-sequence cache [B, N, R/2] (flash-attn's batched cos/sin) indexed by [B, S] positions."""
    B, S, N, D = 3, 4, 20, 64
    q, k = make_qk("bshd", B, S, 2, 1, D, torch.float32)
    ang = angles(B, N, D // 2)
    cos, sin = ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)
    pos = torch.randint(0, N, (B, S), device=DEVICE)
    qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, positions=pos, backend=backend)
    idx = pos.cpu()[..., None].expand(B, S, D // 2)
    cf = to_full(torch.gather(cos.cpu(), 1, idx), False)
    sf = to_full(torch.gather(sin.cpu(), 1, idx), False)
    assert_close(qo, oracle(q, cf, sf, False), torch.float32)
    assert_close(ko, oracle(k, cf, sf, False), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
def test_inplace_and_strided(backend, layout):
    B, S, D, R = 2, 7, 80, 40
    q, k = make_qk(layout, B, S, 3, 1, D, torch.float32)
    Sq = B * S if layout == "thd" else S
    ang = angles(Sq, R // 2)
    cos, sin = ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)
    exp_q, exp_k = posattn.apply_rope_cos_sin(q, k, cos, sin, layout=layout, backend="reference")
    q0, k0 = q.clone(), k.clone()
    qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, layout=layout, inplace=True, backend=backend)
    assert qo is q and ko is k
    assert_close(q, exp_q, torch.float32)
    assert_close(k, exp_k, torch.float32)
    assert torch.equal(q[..., R:], q0[..., R:]) and torch.equal(k[..., R:], k0[..., R:])
    # a q/k slice of a fused qkv projection, rotated in place through the view
    qkv = torch.randn(B, S, 3 + 1 + 1, D, device=DEVICE)
    base = qkv.clone()
    ang = angles(S, R // 2)
    cos, sin = ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)
    posattn.apply_rope_cos_sin(base[:, :, :3], base[:, :, 3:4], cos, sin, inplace=True, backend=backend)
    cf, sf = to_full(cos[None].cpu(), False), to_full(sin[None].cpu(), False)
    assert_close(base[:, :, :3], oracle(qkv[:, :, :3], cf, sf, False), torch.float32)
    assert_close(base[:, :, 3:4], oracle(qkv[:, :, 3:4], cf, sf, False), torch.float32)
    assert torch.equal(base[:, :, 4:], qkv[:, :, 4:])
    # a last dim that is not contiguous
    qt = torch.randn(B, S, 2, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    qo, _ = posattn.apply_rope_cos_sin(qt, None, cos, sin, backend=backend)
    assert_close(qo, oracle(qt, cf, sf, False), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_positions(backend):
    q, k = make_qk("bshd", 1, 4, 2, 1, 32, torch.float32)
    cache = torch.randn(10, 32, device=DEVICE)
    pos = torch.tensor([0, 3, 10, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"positions must index rows .* got a position 10"):
        posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos, backend=backend)
    with pytest.raises(ValueError, match="got a position -3"):
        posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos - 3, backend=backend)
    # unchecked: no sync, no read outside the cache; the bad token is NaN, the others are right
    qo, ko = posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos, check_bounds=False,
                                        backend=backend)
    assert torch.isnan(qo[0, 2]).all() and torch.isnan(ko[0, 2]).all()
    good = torch.tensor([0, 1, 3])
    ref, _ = posattn.apply_rope_cos_sin(q[:, good], None, cos_sin_cache=cache, positions=pos[good],
                                        backend="reference")
    assert_close(qo[:, good], ref, torch.float32)


# ---------------------------------------------------------------------------
# autograd and torch.compile

@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_gradcheck_reference(interleaved):
    """fp64 gradcheck through the custom op (reference backend computes in fp64)."""
    q = torch.randn(2, 2, 1, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 1, 10, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(2, 2, 8, dtype=torch.float64)  # full form [.., R=8], distinct halves
    sin = torch.randn(2, 2, 8, dtype=torch.float64)

    def f(q, k):
        return posattn.apply_rope_cos_sin(q, k, cos, sin, rotary_dim=8, interleaved=interleaved, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k))
    pos = torch.tensor([4, 0])
    cache = torch.randn(6, 8, dtype=torch.float64)

    def g(q, k):
        return posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos, interleaved=interleaved,
                                          backend="reference")

    assert torch.autograd.gradcheck(g, (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_matches_oracle(backend, inplace):
    B, S, D, R = 2, 5, 48, 32
    q0 = torch.randn(B, S, 3, D, device=DEVICE)
    k0 = torch.randn(B, S, 1, D, device=DEVICE)
    cos = torch.randn(B, S, R, device=DEVICE)
    sin = torch.randn(B, S, R, device=DEVICE)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    if inplace:
        qq, kk = q * 1.0, k * 1.0  # non-leaf views autograd may rotate in place
        qo, ko = posattn.apply_rope_cos_sin(qq, kk, cos, sin, rotary_dim=R, inplace=True, backend=backend)
        assert qo is qq
    else:
        qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, rotary_dim=R, backend=backend)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    qr, kr = q0.double().cpu().requires_grad_(), k0.double().cpu().requires_grad_()
    ((oracle_grad(qr, cos, sin) * gq.double().cpu()).sum() + (oracle_grad(kr, cos, sin) * gk.double().cpu()).sum()).backward()
    assert_close(q.grad, qr.grad, torch.float32)
    assert_close(k.grad, kr.grad, torch.float32)


def oracle_grad(x, cos, sin):
    """The oracle in differentiable form (x fp64 CPU with grad)."""
    R = cos.shape[-1]
    c, s = cos.double().cpu()[:, :, None], sin.double().cpu()[:, :, None]
    rot, rest = x[..., :R], x[..., R:]
    rh = torch.cat((-rot[..., R // 2:], rot[..., :R // 2]), dim=-1)
    return torch.cat((rot * c + rh * s, rest), dim=-1)


def test_torch_compile_fullgraph():
    q = torch.randn(1, 4, 2, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 4, 1, 32, device=DEVICE, requires_grad=True)
    cache = torch.randn(16, 32, device=DEVICE)
    pos = torch.tensor([3, 1, 4, 1], device=DEVICE)

    def f(q, k):
        qo, ko = posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos)
        return (qo * 2).sum() + ko.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k)
    out.backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    f(q2, k2).backward()
    assert_close(out.detach(), f(q.detach(), k.detach()), torch.float32)
    assert_close(q.grad, q2.grad, torch.float32)
    assert_close(k.grad, k2.grad, torch.float32)


def test_torch_compile_fullgraph_inplace_and_tables():
    """The in-place op (a mutating custom op) and the per-token tables also trace without breaks."""
    q = torch.randn(5, 3, 32, device=DEVICE)
    k = torch.randn(5, 1, 32, device=DEVICE)
    cos, sin = torch.randn(5, 16, device=DEVICE), torch.randn(5, 16, device=DEVICE)

    def f(q, k):
        posattn.apply_rope_cos_sin(q, k, cos, sin, layout="thd", inplace=True)
        return q + 0, k + 0

    q1, k1 = q.clone(), k.clone()
    f(q1, k1)
    q2, k2 = q.clone(), k.clone()
    a, b = torch.compile(f, fullgraph=True, backend="aot_eager")(q2, k2)
    assert torch.equal(a, q1) and torch.equal(b, k1) and torch.equal(q2, q1)


# ---------------------------------------------------------------------------
# bad inputs: each a ValueError/TypeError naming the argument, before any kernel runs

def _ok():
    q = torch.randn(2, 5, 4, 64)
    k = torch.randn(2, 5, 2, 64)
    ang = angles(5, 32)
    return q, k, ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("case, exc, match", [
    ("no_tables", ValueError, "pass cos and sin"),
    ("both", ValueError, "not both"),
    ("cache_no_pos", ValueError, "cos_sin_cache needs positions"),
    ("cache_rank", ValueError, r"cos_sin_cache must be \[max_position, rotary_dim\]"),
    ("cache_odd", ValueError, "cos_sin_cache's last dim"),
    ("shape_mismatch", ValueError, "cos and sin must have the same shape"),
    ("dtype_mismatch", TypeError, "cos and sin must have the same dtype"),
    ("int_cos", TypeError, "cos must be float32"),
    ("seq_len", ValueError, r"cos/sin of shape \[S, W\] must have S = 5"),
    ("table_batch", ValueError, "must have B = 2 or 1"),
    ("table_rank", ValueError, "cos/sin must be 2-D"),
    ("rotary_dim", ValueError, r"cos/sin's last dim \(32\) must be rotary_dim/2"),
    ("rotary_dim_big", ValueError, r"rotary_dim \(128\) must be <= q's head_dim"),
    ("odd_full", ValueError, "needs an even width"),
    ("float_pos", TypeError, "positions must be an integer tensor"),
    ("pos_shape", ValueError, r"positions of shape \[S\] must have S = 5"),
    ("k_heads_dim", ValueError, "k's head_dim"),
    ("layout", ValueError, "layout must be one of"),
    ("inplace_type", TypeError, "inplace must be a bool"),
    ("backend", ValueError, "backend must be one of"),
    ("device", ValueError, "cos is on meta"),
])
def test_bad_inputs(case, exc, match):
    q, k, cos, sin = _ok()
    kw = {}
    if case == "no_tables":
        cos = sin = None
    elif case == "both":
        kw["cos_sin_cache"] = torch.randn(8, 64)
    elif case == "cache_no_pos":
        cos = sin = None
        kw["cos_sin_cache"] = torch.randn(8, 64)
    elif case == "cache_rank":
        cos = sin = None
        kw.update(cos_sin_cache=torch.randn(1, 8, 64), positions=torch.arange(5))
    elif case == "cache_odd":
        cos = sin = None
        kw.update(cos_sin_cache=torch.randn(8, 63), positions=torch.arange(5))
    elif case == "shape_mismatch":
        sin = sin[:4]
    elif case == "dtype_mismatch":
        sin = sin.half()
    elif case == "int_cos":
        cos = torch.zeros(5, 32, dtype=torch.int32)
    elif case == "seq_len":
        cos, sin = cos[:4], sin[:4]
    elif case == "table_batch":
        cos, sin = cos.expand(3, 5, 32), sin.expand(3, 5, 32)
    elif case == "table_rank":
        cos, sin = cos[None, None], sin[None, None]
    elif case == "rotary_dim":
        kw["rotary_dim"] = 48
    elif case == "rotary_dim_big":
        cos, sin = torch.randn(5, 64), torch.randn(5, 64)
        kw["rotary_dim"] = 128
    elif case == "odd_full":
        cos, sin = torch.randn(5, 33), torch.randn(5, 33)
    elif case == "float_pos":
        kw["positions"] = torch.arange(5.0)
    elif case == "pos_shape":
        kw["positions"] = torch.arange(6)
    elif case == "k_heads_dim":
        k = torch.randn(2, 5, 2, 32)
    elif case == "layout":
        kw["layout"] = "sbhd"
    elif case == "inplace_type":
        kw["inplace"] = 1
    elif case == "backend":
        kw["backend"] = "tpu"
    elif case == "device":
        cos = cos.to("meta")
    with pytest.raises(exc, match=match):
        posattn.apply_rope_cos_sin(q, k, cos, sin, **kw)


_AOT_SCRIPT = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile
from posattn.kernels.triton import rope_cos_sin as tr
n = 0
for name, fn, sig, constexprs, num_warps in tr.aot_specializations(head_dims=(92,), dtypes=(torch.bfloat16,),
                                                                   table_dtypes=("fp32",)):
    for arch in ((90, 80) if n == 0 else (90,)):
        k = tcompile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                     options={"num_warps": num_warps})
        assert k.asm.get("ptx") and k.asm.get("cubin"), (name, arch)
        n += 1
# fp64 q/k compute in fp64 (FP64 constexpr): one specialisation per table dtype
for name, fn, sig, constexprs, num_warps in list(tr.aot_specializations(
        head_dims=(80,), dtypes=(torch.float64,), table_dtypes=("fp32", "fp64")))[:8:4]:
    assert constexprs["FP64"] and "fp64" in name
    k = tcompile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                 options={"num_warps": num_warps})
    assert k.asm.get("cubin"), name
    assert ".f64" in k.asm["ptx"], name
    n += 1
print("compiled", n)
"""


def test_triton_aot_compiles_for_sm90a_and_sm80():
    """Triton specialisations compile for sm_90a and sm_80 (no GPU needed). Run in a subprocess:
    under TRITON_INTERPRET=1 the kernels are interpreted functions that cannot be compiled."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled" in r.stdout


def test_bench_cases_registered_and_checked():
    """`posattn bench` times the cos/sin paths (op "rope_cos_sin"); each posattn impl usable on
    CPU tensors gives the reference's answer on a small case."""
    from posattn.bench.registry import ops

    op = ops()["rope_cos_sin"]
    assert {"cuda", "triton", "cpu", "reference", "cuda-tables", "cpu-tables", "posattn-on-the-fly",
            "flashinfer-cache", "vllm"} <= set(op.impls)
    assert op.impls["vllm"].available("cpu") == (False, "CUDA only")
    inp = op.make_inputs(op.parse_shape("B=2,S=3,Hq=3,Hk=1,D=64"), torch.float32, "cpu")
    ref = op.reference(inp)
    for name in ("cpu", "cpu-tables", "reference", "posattn-on-the-fly"):
        out = op.impls[name].factory(inp, "cpu")()
        for o, r in zip(out, ref):
            assert_close(o, r, torch.float32, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_fp64_qk_are_computed_in_fp64(backend, table_dtype, interleaved):
    """fp64 q/k: every backend computes in fp64 (never through fp32), so the result equals the
    fp64 oracle to 1e-12 (an fp32 detour is off by ~1e-7). Per-token tables and a cache."""
    B, S, HQ, HK, D, R = 2, 7, 3, 1, 80, 48
    q, k = make_qk("bshd", B, S, HQ, HK, D, torch.float64)
    ang = angles(B, S, R // 2)
    cos, sin = ang.cos().to(table_dtype).to(DEVICE), ang.sin().to(table_dtype).to(DEVICE)
    qo, ko = posattn.apply_rope_cos_sin(q, k, cos, sin, interleaved=interleaved, backend=backend)
    cf, sf = to_full(cos.cpu(), interleaved), to_full(sin.cpu(), interleaved)
    assert qo.dtype == torch.float64 and ko.dtype == torch.float64
    torch.testing.assert_close(qo.cpu(), oracle(q, cf, sf, interleaved), rtol=0, atol=1e-12)
    torch.testing.assert_close(ko.cpu(), oracle(k, cf, sf, interleaved), rtol=0, atol=1e-12)
    # a cache indexed by positions, one shared by the batch
    N = 11
    cang = angles(N, R // 2)
    cc, cs = cang.cos().to(table_dtype).to(DEVICE), cang.sin().to(table_dtype).to(DEVICE)
    pos = torch.randint(0, N, (B, S), device=DEVICE)
    qo, _ = posattn.apply_rope_cos_sin(q, None, cc, cs, positions=pos, interleaved=interleaved, backend=backend)
    rows = pos.cpu()
    torch.testing.assert_close(qo.cpu(), oracle(q, to_full(cc.cpu()[rows], interleaved),
                                                to_full(cs.cpu()[rows], interleaved), interleaved),
                               rtol=0, atol=1e-12)

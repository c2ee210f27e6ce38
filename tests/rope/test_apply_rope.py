"""apply_rope on every usable backend against the fp64 reference."""
import random

import pytest
import torch

import posattn
from tests.rope import _rope_helpers as H
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends

BACKENDS = usable_backends("rope")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(q, k, positions, spec, layout):
    """fp64 oracle written independently of the op's layout handling and of posattn's reference kernel."""
    return H.oracle(q, k, positions, spec, layout)


def make(layout, B, S, HQ, HK, D, dtype, device, pos_batched, pos_dtype=torch.int64, max_pos=4096):
    q, k = H.rand_qk(layout, B, S, HQ, HK, D, dtype, device)
    pos = H.positions_for(1, layout, B, S, pos_dtype, device, pos_batched, max_pos)
    return q, k, pos


# random shapes including the odd ones the issue names (80/96, 7 tokens, 3 heads, GQA)
_rng = random.Random(1234)
SHAPES = [
    # B, S, HQ, HK, D, rotary_dim
    (1, 7, 3, 1, 80, None),
    (2, 7, 3, 3, 96, 48),
    (2, 5, 4, 2, 64, 32),
    (1, 1, 8, 2, 128, None),
    (3, 4, 2, 1, 96, None),
    (1, 9, 5, 0, 80, 20),  # no k
] + [(_rng.randint(1, 3), _rng.randint(1, 9), _rng.randint(1, 6), _rng.randint(0, 3),
      _rng.choice([32, 64, 80, 96, 128]), None) for _ in range(3)]
INTERP_SHAPES = [(1, 3, 3, 1, 80, None), (2, 2, 3, 3, 96, 48), (1, 1, 8, 2, 128, None), (1, 2, 5, 0, 80, 20)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_matches_reference(backend, dtype, layout, interleaved):
    # the Triton interpreter costs ~30 ms per program (one per token and head block):
    # on CPU it gets a few odd shapes with few tokens
    shapes = INTERP_SHAPES if backend == "triton" and DEVICE == "cpu" else SHAPES
    for i, (B, S, HQ, HK, D, rd) in enumerate(shapes):
        spec = posattn.RopeSpec(D, rotary_dim=rd, interleaved=interleaved)
        q, k, pos = make(layout, B, S, HQ, HK, D, dtype, DEVICE, pos_batched=i % 2 == 1,
                         pos_dtype=(torch.int32, torch.int64, torch.float32)[i % 3])
        qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout, backend=backend)
        rq, rk = reference(q, k, pos, spec, layout)
        assert qo.dtype == dtype and qo.shape == q.shape
        assert_close(qo, rq, dtype, msg=f"q shape {(B, S, HQ, HK, D, rd)}")
        if k is not None:
            assert_close(ko, rk, dtype, msg=f"k shape {(B, S, HQ, HK, D, rd)}")
        else:
            assert ko is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_rotary_leaves_tail_untouched(backend):
    spec = posattn.RopeSpec(96, rotary_dim=32)
    q, k, pos = make("bshd", 2, 5, 3, 1, 96, torch.float32, DEVICE, False)
    qo, ko = posattn.apply_rope(q, k, pos, spec, backend=backend)
    assert torch.equal(qo[..., 32:], q[..., 32:])
    assert torch.equal(ko[..., 32:], k[..., 32:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_zero_tokens(backend, layout):
    """A shard or batch with no tokens (a context-parallel rank can hold none) gives empty
    outputs, as the reference does; the C++ path once refused it ("pos: null pointer")."""
    spec = posattn.RopeSpec(64)
    shape = (0, 4, 64) if layout == "thd" else (2, 0, 4, 64)
    q = torch.randn(*shape, device=DEVICE)
    k = torch.randn(*shape[:-2], 2, 64, device=DEVICE)
    pos = torch.zeros(shape[:-2], dtype=torch.int64, device=DEVICE)
    for inplace in (False, True):
        qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout, inplace=inplace, backend=backend)
        assert qo.shape == q.shape and ko.shape == k.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
def test_inplace(backend, layout):
    spec = posattn.RopeSpec(80, rotary_dim=40)
    q, k, pos = make(layout, 2, 7, 3, 1, 80, torch.float32, DEVICE, False)
    expected = posattn.apply_rope(q, k, pos, spec, layout=layout, backend="reference")
    q0, k0 = q.clone(), k.clone()
    qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout, inplace=True, backend=backend)
    assert qo is q and ko is k
    assert not torch.equal(q, q0)
    assert_close(q, expected[0], torch.float32)
    assert_close(k, expected[1], torch.float32)
    assert torch.equal(q[..., 40:], q0[..., 40:]) and torch.equal(k[..., 40:], k0[..., 40:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    spec = posattn.RopeSpec(64)
    # a q/k slice of a fused qkv projection: last dim contiguous, other strides not
    qkv = torch.randn(2, 7, 3 + 2 + 2, 64, device=DEVICE)
    q, k = qkv[:, :, :3], qkv[:, :, 3:5]
    pos = torch.arange(7, device=DEVICE)
    qo, ko = posattn.apply_rope(q, k, pos, spec, backend=backend)
    rq, rk = reference(q, k, pos, spec, "bshd")
    assert_close(qo, rq, torch.float32)
    assert_close(ko, rk, torch.float32)
    # a last dim that is not contiguous, and non-contiguous positions
    qt = torch.randn(2, 7, 3, 64, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    pos_nc = torch.arange(14, device=DEVICE)[::2]
    qo, _ = posattn.apply_rope(qt, None, pos_nc, spec, backend=backend)
    rq, _ = reference(qt, None, pos_nc, spec, "bshd")
    assert_close(qo, rq, torch.float32)
    # in place on a strided view writes through to the base tensor
    base = qkv.clone()
    posattn.apply_rope(base[:, :, :3], None, pos, spec, inplace=True, backend=backend)
    assert_close(base[:, :, :3], reference(q, None, pos, spec, "bshd")[0], torch.float32)
    assert torch.equal(base[:, :, 3:], qkv[:, :, 3:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_positions_angle_exact(backend):
    """fp64 range reduction keeps angles exact far past 2^24."""
    spec = posattn.RopeSpec(64, base=10000.0)
    pos = torch.tensor([0, 1, 2**24 + 1, 10**6 + 7, 2**31 - 1], dtype=torch.int64, device=DEVICE)
    q = torch.randn(1, 5, 2, 64, dtype=torch.float32, device=DEVICE)
    qo, _ = posattn.apply_rope(q, None, pos, spec, backend=backend)
    rq, _ = reference(q, None, pos, spec, "bshd")
    assert_close(qo, rq, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", H.TABLE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_table_variants(backend, kind, dtype):
    """Every lowering feature (scaling, mrope sections, per-head rows, DPE) x position dtypes x layouts."""
    for j, (layout, interleaved, pos_dtype) in enumerate([("bshd", False, torch.int64),
                                                          ("thd", True, torch.float32),
                                                          ("bhsd", False, torch.int32)]):
        spec = H.TableSpec(80, rotary_dim=64, interleaved=interleaved, fixed=H.make_tables(kind, 64, 2))
        q, k = H.rand_qk(layout, 2, 3, 4, 2, 80, dtype, DEVICE)
        pos = H.positions_for(spec.fixed.n_axes, layout, 2, 3, pos_dtype, DEVICE, batched=j == 0)
        qo, ko = posattn.apply_rope(q, k, pos, spec, layout=layout, backend=backend)
        rq, rk = H.oracle(q, k, pos, spec, layout)
        assert_close(qo, rq, dtype, msg=f"{kind} {layout} q")
        assert_close(ko, rk, dtype, msg=f"{kind} {layout} k")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fractional_positions(backend):
    """float32 positions (V2PE's fractional increments) rotate by the fractional angle."""
    spec = posattn.RopeSpec(64)
    q, k = H.rand_qk("bshd", 1, 6, 2, 1, 64, torch.float32, DEVICE)
    pos = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0625, 3000.5], device=DEVICE)
    qo, ko = posattn.apply_rope(q, k, pos, spec, backend=backend)
    rq, rk = reference(q, k, pos, spec, "bshd")
    assert_close(qo, rq, torch.float32)
    assert_close(ko, rk, torch.float32)
    # a half step is not the integer step
    qi, _ = posattn.apply_rope(q, None, torch.tensor([0, 0, 0, 1, 1, 3000], device=DEVICE), spec,
                               backend=backend)
    assert not torch.allclose(qo[:, 1], qi[:, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_axis_position_formats(backend):
    """[n_axes, S], [n_axes, B, S] and [n_axes, T]; equal axes give the 1-axis rotation."""
    spec3 = H.TableSpec(64, fixed=H.make_tables("mrope", 64))
    spec1 = H.TableSpec(64, fixed=H.make_tables("plain", 64))
    q, k = H.rand_qk("bshd", 2, 4, 3, 1, 64, torch.float32, DEVICE)
    p1 = torch.arange(4, device=DEVICE) * 3 + 1
    for pos in (p1.expand(3, 4), torch.stack([p1, p1]).expand(3, 2, 4)):
        qo, ko = posattn.apply_rope(q, k, pos, spec3, backend=backend)
        ro = posattn.apply_rope(q, k, p1, spec1, backend="reference")
        assert_close(qo, ro[0], torch.float32)
        assert_close(ko, ro[1], torch.float32)
    pos = torch.randint(0, 100, (3, 2, 4), device=DEVICE)
    qo, ko = posattn.apply_rope(q, k, pos, spec3, backend=backend)
    rq, rk = H.oracle(q, k, pos, spec3)
    assert_close(qo, rq, torch.float32)
    # packed: [n_axes, T]
    qt, kt = q.reshape(8, 3, 64), k.reshape(8, 1, 64)
    qo, ko = posattn.apply_rope(qt, kt, pos.reshape(3, 8), spec3, layout="thd", backend=backend)
    assert_close(qo.reshape(2, 4, 3, 64), rq, torch.float32)
    assert_close(ko.reshape(2, 4, 1, 64), rk, torch.float32)


def test_seq_len_dependent_tables():
    """Specs whose tables depend on the length get max(positions) + 1, or the seq_len given."""
    spec = H.TableSpec(32, fixed=H.make_tables("plain", 32), seq_len_dependent=True)
    q = torch.randn(1, 3, 2, 32, device=DEVICE)
    posattn.apply_rope(q, None, torch.tensor([5, 9, 2], device=DEVICE), spec)
    posattn.apply_rope(q, None, torch.tensor([5, 9, 2], device=DEVICE), spec, seq_len=4096)
    assert spec.seen_seq_len[-2:] == [10, 4096]
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        posattn.apply_rope(q, None, torch.tensor([5, 9, 2], device=DEVICE), spec, seq_len=0)


def _real_specs():
    """Specs built by the spec side (posattn.rope.spec / scaling), lowered by spec.tables()."""
    D = 64
    return {
        "llama3": posattn.RopeSpec(D, base=5e5, scaling=posattn.Llama3(8.0, 1.0, 4.0, 64)),
        "yarn": posattn.RopeSpec(D, base=1e4, scaling=posattn.YaRN(4.0, 64)),
        "dynamic_ntk": posattn.RopeSpec(D, scaling=posattn.DynamicNTK(2.0, 16)),
        "mrope": posattn.RopeSpec(D, mrope_section=(8, 12, 12)),
        "mrope_interleaved": posattn.RopeSpec(D, mrope_section=(12, 10, 10), mrope_interleaved=True),
        "dpe": posattn.RopeSpec(D, dpe=posattn.DPE.for_window((0, 8, 20, 32), (1.0, 2.0, 4.0), 16)),
        "custom_per_group": posattn.RopeSpec(
            D, scaling=posattn.Custom(torch.rand(2, 32).mul(0.9).add(0.01).tolist())),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_real_specs()))
def test_real_specs(backend, name):
    spec = _real_specs()[name]
    q, k = H.rand_qk("bshd", 2, 3, 4, 2, 64, torch.float32, DEVICE)
    tables = spec.tables("cpu", 200 if spec.depends_on_seq_len else None)
    pos = H.positions_for(tables.n_axes, "bshd", 2, 3, torch.int64, DEVICE, batched=True, max_pos=200)
    seq_len = int(pos.max()) + 1 if spec.depends_on_seq_len else None
    qo, ko = posattn.apply_rope(q, k, pos, spec, backend=backend)
    rq, rk = H.oracle(q, k, pos, spec, tables=spec.tables("cpu", seq_len))
    assert_close(qo, rq, torch.float32, msg=name)
    assert_close(ko, rk, torch.float32, msg=name)


def test_auto_choice_and_memo():
    from posattn import dispatch

    spec = posattn.RopeSpec(64)
    q = torch.randn(1, 3, 2, 64, device=DEVICE)
    posattn.apply_rope(q, None, torch.arange(3, device=DEVICE), spec)
    keys = [k for k in dispatch._memo if k[0] == "rope"]
    assert keys, "the decision must be memoised"
    chosen = dispatch._memo[keys[-1]][0].backend
    assert chosen == ("cuda" if DEVICE == "cuda" and dispatch.backend_status("cuda")[0] else
                      "triton" if DEVICE == "cuda" else "cpu")


def test_use_backend_context_and_env(monkeypatch):
    from posattn import dispatch

    spec = posattn.RopeSpec(32)
    q = torch.randn(1, 3, 2, 32, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    calls = []
    with posattn.use_backend("reference"):
        kern, _ = dispatch.select("rope", _key(q, spec))
        calls.append(kern.backend)
    monkeypatch.setenv("POSATTN_BACKEND", "reference")
    calls.append(dispatch.select("rope", _key(q, spec))[0].backend)
    # explicit argument beats the environment
    calls.append(dispatch.select("rope", _key(q, spec), backend=BACKENDS[0])[0].backend)
    assert calls == ["reference", "reference", BACKENDS[0]]
    monkeypatch.setenv("POSATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="POSATTN_BACKEND"):
        posattn.apply_rope(q, None, pos, spec)


def _key(q, spec):
    from posattn.rope.layout import RopeKey

    return RopeKey(q.device.type, str(q.dtype).removeprefix("torch."), spec.head_dim, spec.rotary_dim,
                   spec.interleaved, q.shape[2], 0, "int64", 4)


# ---------------------------------------------------------------------------
# bad inputs: each a ValueError/TypeError naming the argument

def _ok():
    q = torch.randn(2, 5, 4, 64)
    k = torch.randn(2, 5, 2, 64)
    return q, k, torch.arange(5), posattn.RopeSpec(64)


@pytest.mark.parametrize("case, exc, match", [
    ("k_seq", ValueError, "k's sequence length"),
    ("k_batch", ValueError, "k's batch"),
    ("k_dim", ValueError, "k's head_dim"),
    ("k_rank", ValueError, "k must be 4-D"),
    ("k_dtype", TypeError, "k must have q's dtype"),
    ("q_rank", ValueError, "q must be 4-D"),
    ("spec_dim", ValueError, "spec.head_dim"),
    ("half_pos", TypeError, "positions must be int32, int64, float32 or float64"),
    ("pos_len", ValueError, "positions"),
    ("pos_rank", ValueError, "positions must be"),
    ("pos_batch", ValueError, r"positions of shape \[B, S\]"),
    ("int_q", TypeError, "q must be float32"),
    ("q_not_tensor", TypeError, "q must be a torch.Tensor"),
    ("spec_type", TypeError, "spec must be a posattn.RopeSpec"),
    ("layout", ValueError, "layout must be one of"),
    ("backend", ValueError, "backend must be one of"),
    ("backend_type", TypeError, "backend must be a backend name"),
    ("inplace_type", TypeError, "inplace must be a bool"),
    ("device", ValueError, "positions is on meta"),
    ("mrope_no_axis", ValueError, r"positions must be \[n_axes, S\] or \[n_axes, B, S\] with n_axes = 3"),
    ("mrope_bad_inner", ValueError, r"positions of shape \[n_axes\] \+ \[S\] must have S = 5"),
    ("perhead_rows", ValueError, "per-head inv_freq has 3 rows"),
])
def test_bad_inputs(case, exc, match):
    q, k, pos, spec = _ok()
    kw = {}
    if case == "k_seq":
        k = torch.randn(2, 6, 2, 64)
    elif case == "k_batch":
        k = torch.randn(3, 5, 2, 64)
    elif case == "k_dim":
        k = torch.randn(2, 5, 2, 32)
    elif case == "k_rank":
        k = torch.randn(5, 2, 64)
    elif case == "k_dtype":
        k = k.half()
    elif case == "q_rank":
        q = torch.randn(5, 4, 64)
    elif case == "spec_dim":
        spec = posattn.RopeSpec(32)
    elif case == "half_pos":
        pos = pos.half()
    elif case == "pos_len":
        pos = torch.arange(6)
    elif case == "pos_rank":
        pos = torch.zeros(2, 5, 1, dtype=torch.long)
    elif case == "pos_batch":
        pos = torch.zeros(3, 5, dtype=torch.long)
    elif case == "int_q":
        q = torch.zeros(2, 5, 4, 64, dtype=torch.int32)
    elif case == "q_not_tensor":
        q = q.numpy()
    elif case == "spec_type":
        spec = {"head_dim": 64}
    elif case == "layout":
        kw["layout"] = "sbhd"
    elif case == "backend":
        kw["backend"] = "tpu"
    elif case == "backend_type":
        kw["backend"] = 3
    elif case == "inplace_type":
        kw["inplace"] = "yes"
    elif case == "device":
        pos = torch.arange(5, device="meta")
    elif case == "mrope_no_axis":
        spec = H.TableSpec(64, fixed=H.make_tables("mrope", 64))
    elif case == "mrope_bad_inner":
        spec = H.TableSpec(64, fixed=H.make_tables("mrope", 64))
        pos = torch.zeros(3, 6, dtype=torch.long)
    elif case == "perhead_rows":
        spec = H.TableSpec(64, fixed=H.make_tables("perhead", 64, 3))
    with pytest.raises(exc, match=match):
        posattn.apply_rope(q, k, pos, spec, **kw)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"head_dim": 64, "rotary_dim": 33}, ValueError, "rotary_dim must be a positive even"),
    ({"head_dim": 64, "rotary_dim": 128}, ValueError, r"rotary_dim \(128\) must be <= head_dim"),
    ({"head_dim": 64, "rotary_dim": 0}, ValueError, "rotary_dim"),
    ({"head_dim": 0}, ValueError, "head_dim must be positive"),
    ({"head_dim": 64.0}, TypeError, "head_dim must be an int"),
    ({"head_dim": 64, "base": 1.0}, ValueError, "base"),
    ({"head_dim": 64, "interleaved": 1}, TypeError, "interleaved"),
])
def test_bad_specs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        posattn.RopeSpec(**kwargs)


def test_backend_not_usable_is_clear():
    from posattn import dispatch

    ok, _ = dispatch.backend_status("cuda")
    if ok:
        pytest.skip("cuda is usable here")
    q, k, pos, spec = _ok()
    with pytest.raises(ValueError, match="backend='cuda'"):
        posattn.apply_rope(q, k, pos, spec, backend="cuda")

"""apply_rope's per-signature plans (the eager, no-grad hot path; posattn/rope/plans.py).

A plan stores what the checks, the kernel key and the backend choice decided for one
signature (shapes, strides, dtypes, devices, spec, layout, inplace, backend request).
These tests check that a changed signature gets a fresh plan (and bad inputs still
raise), that the cache is bounded and dropped by dispatch.clear_memo(), and that
results are bit-identical with and without plans.
"""
import pytest
import torch

import posattn
from posattn import dispatch
from posattn.rope import plans
from tests.conftest import DEVICE
from tests.rope import test_apply_rope as T

SPEC = posattn.RopeSpec(32, rotary_dim=24)


@pytest.fixture(autouse=True)
def _fresh_plans():
    plans.clear_plans()
    yield
    plans.clear_plans()


def _inputs(layout="bshd", B=2, S=5, HQ=3, HK=1, D=32, dtype=torch.float32):
    shape = {"bshd": (B, S, HQ, D), "bhsd": (B, HQ, S, D), "thd": (S, HQ, D)}[layout]
    kshape = {"bshd": (B, S, HK, D), "bhsd": (B, HK, S, D), "thd": (S, HK, D)}[layout]
    q = torch.randn(shape, dtype=dtype, device=DEVICE)
    k = torch.randn(kshape, dtype=dtype, device=DEVICE)
    pos = torch.randint(0, 1000, (S,), device=DEVICE)
    return q, k, pos


def _without_plans(module, table, op, monkeypatch, *args, **kw):
    """``op`` with its module's plans turned off (every check and select on every call)."""
    with monkeypatch.context() as m:
        m.setattr(module, "PLAN_CACHE_SIZE", 0)
        before = dict(table)
        out = op(*args, **kw)
        assert table == before, "PLAN_CACHE_SIZE=0 must not store plans"
        return out


def _uncached(monkeypatch, *args, **kw):
    return _without_plans(plans, plans.PLANS, posattn.apply_rope, monkeypatch, *args, **kw)


def _same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        assert torch.equal(a, b)


def test_repeated_signature_reuses_one_plan(monkeypatch):
    q, k, pos = _inputs()
    out1 = posattn.apply_rope(q, k, pos, SPEC)
    assert len(plans.PLANS) == 1
    plan = next(iter(plans.PLANS.values()))
    q2, k2, pos2 = _inputs()  # new tensors, same signature
    out2 = posattn.apply_rope(q2, k2, pos2, SPEC)
    assert list(plans.PLANS.values()) == [plan]
    for got, want in zip(out1 + out2, _uncached(monkeypatch, q, k, pos, SPEC) + _uncached(monkeypatch, q2, k2, pos2, SPEC)):
        _same(got, want)
    # an equal spec built separately finds the same plan
    posattn.apply_rope(q2, k2, pos2, posattn.RopeSpec(32, rotary_dim=24))
    assert list(plans.PLANS.values()) == [plan]


def _variants():
    """name -> (args, kwargs) differing from the base call in one thing the plan depends on."""
    q, k, pos = _inputs()
    wide = torch.randn(2, 5, 3, 64, device=DEVICE)
    return q, k, pos, {
        "stride": ((wide[..., :32], k, pos, SPEC), {}),                      # same shape, other strides
        "last_dim_strided": ((torch.randn(2, 5, 3, 64, device=DEVICE)[..., ::2], k, pos, SPEC), {}),
        "dtype": ((q.double(), k.double(), pos, SPEC), {}),
        "shape": ((q[:, :4], k[:, :4], pos[:4], SPEC), {}),
        "heads": ((torch.randn(2, 5, 2, 32, device=DEVICE), k, pos, SPEC), {}),
        "no_k": ((q, None, pos, SPEC), {}),
        "pos_dtype": ((q, k, pos.int(), SPEC), {}),
        "pos_batched": ((q, k, pos.expand(2, 5), SPEC), {}),
        "float_pos": ((q, k, pos.double() + 0.25, SPEC), {}),
        "spec": ((q, k, pos, posattn.RopeSpec(32, interleaved=True)), {}),
        "layout": ((q.transpose(1, 2), k.transpose(1, 2), pos, SPEC), {"layout": "bhsd"}),
        "inplace": ((q.clone(), k.clone(), pos, SPEC), {"inplace": True}),
        "backend": ((q, k, pos, SPEC), {"backend": "reference"}),
        "seq_len": ((q, k, pos, SPEC), {"seq_len": 7}),
    }


@pytest.mark.parametrize("name", list(_variants()[3]))
def test_changed_signature_gets_a_fresh_plan(monkeypatch, name):
    q, k, pos, variants = _variants()
    posattn.apply_rope(q, k, pos, SPEC)
    first = set(plans.PLANS)
    args, kw = variants[name]
    want_args = tuple(a.clone() if isinstance(a, torch.Tensor) and kw.get("inplace") else a for a in args)
    got = posattn.apply_rope(*args, **kw)
    new = set(plans.PLANS) - first
    assert len(new) == 1, f"{name}: expected one new plan, got {len(new)}"
    assert len(plans.PLANS) == 2
    want = _uncached(monkeypatch, *want_args, **kw)
    for g, w in zip(got, want):
        _same(g, w)
    # and the base signature still runs its own plan
    _same(posattn.apply_rope(q, k, pos, SPEC)[0], _uncached(monkeypatch, q, k, pos, SPEC)[0])
    assert len(plans.PLANS) == 2


def test_backend_request_context_and_env_are_part_of_the_key(monkeypatch):
    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC)
    chosen = [p.kernel.backend for p in plans.PLANS.values()]
    with posattn.use_backend("reference"):
        posattn.apply_rope(q, k, pos, SPEC)
    monkeypatch.setenv("POSATTN_BACKEND", "reference")
    posattn.apply_rope(q, k, pos, SPEC)
    backends = [p.kernel.backend for p in plans.PLANS.values()]
    assert backends == chosen + ["reference", "reference"]
    # a bad environment value is still reported although plans exist for these inputs
    monkeypatch.setenv("POSATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="POSATTN_BACKEND"):
        posattn.apply_rope(q, k, pos, SPEC)
    monkeypatch.delenv("POSATTN_BACKEND")
    posattn.apply_rope(q, k, pos, SPEC)
    assert len(plans.PLANS) == 3


def test_grad_mode_bypasses_plans():
    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC)
    assert len(plans.PLANS) == 1
    qg = q.clone().requires_grad_()
    qo, ko = posattn.apply_rope(qg, k, pos, SPEC)
    assert qo.grad_fn is not None, "with grad the custom op (and its backward) must run"
    qo.sum().backward()
    assert qg.grad is not None and qg.grad.shape == q.shape
    assert len(plans.PLANS) == 1
    with torch.no_grad():  # requires_grad but grad disabled: the plan is fine
        qo2, _ = posattn.apply_rope(qg, k, pos, SPEC)
    assert qo2.grad_fn is None
    _same(qo2, qo.detach())


@pytest.mark.parametrize("case, exc, match", T.test_bad_inputs.pytestmark[-1].args[1])
def test_bad_inputs_raise_with_plans_warm(case, exc, match):
    """Every bad-input case of test_apply_rope, after its good signature has a plan."""
    q, k, pos, spec = T._ok()
    posattn.apply_rope(q, k, pos, spec)
    for kw in ({"layout": "bshd"}, {"inplace": False}, {"backend": "reference"}):
        posattn.apply_rope(q, k, pos, spec, **kw)
    assert plans.PLANS
    T.test_bad_inputs(case, exc, match)


@pytest.mark.parametrize("kw, exc, match", [
    ({"inplace": 0}, TypeError, "inplace must be a bool"),       # 0 == False and hash(0) == hash(False)
    ({"inplace": 1}, TypeError, "inplace must be a bool"),
    ({"seq_len": True}, ValueError, "seq_len must be a positive int"),  # True == 1
    ({"seq_len": 0}, ValueError, "seq_len must be a positive int"),
    ({"seq_len": 5.0}, ValueError, "seq_len must be a positive int"),
    ({"backend": "tpu"}, ValueError, "backend must be one of"),
    ({"layout": ["bshd"]}, ValueError, "layout must be one of"),  # unhashable: never a key
    ({"backend": ["cpu"]}, TypeError, "backend must be a backend name"),
])
def test_equal_hashing_arguments_are_still_checked(kw, exc, match):
    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC)
    posattn.apply_rope(q, k, pos, SPEC, inplace=False)
    posattn.apply_rope(q, k, pos, SPEC, seq_len=1)
    with pytest.raises(exc, match=match):
        posattn.apply_rope(q, k, pos, SPEC, **kw)


def test_other_device_still_raises():
    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC)
    with pytest.raises(ValueError, match="positions is on meta"):
        posattn.apply_rope(q, k, torch.arange(5, device="meta"), SPEC)
    with pytest.raises(ValueError, match="k is on meta"):
        posattn.apply_rope(q, k.to("meta"), pos, SPEC)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(plans, "PLAN_CACHE_SIZE", 4)
    for s in range(1, 12):
        q, k, pos = _inputs(S=s)
        posattn.apply_rope(q, k, pos, SPEC)
        assert 1 <= len(plans.PLANS) <= 4


def test_clear_memo_and_autotune_reload_drop_plans():
    from posattn import autotune

    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC)
    assert plans.PLANS
    dispatch.clear_memo()
    assert not plans.PLANS
    posattn.apply_rope(q, k, pos, SPEC)
    assert plans.PLANS
    autotune.reload()
    assert not plans.PLANS


def test_seq_len_dependent_specs_are_not_planned_without_seq_len(monkeypatch):
    """Their tables depend on max(positions): each call must look at the values."""
    spec = posattn.RopeSpec(32, scaling=posattn.DynamicNTK(2.0, 16))
    q, k, _ = _inputs()
    outs = []
    for top in (3, 100):  # the second needs the NTK-scaled tables (100 > 16)
        pos = torch.tensor([0, 1, 2, top - 2, top - 1], device=DEVICE)
        outs.append(posattn.apply_rope(q, k, pos, spec))
        assert not plans.PLANS
        _same(outs[-1][0], _uncached(monkeypatch, q, k, pos, spec)[0])
    # with seq_len the tables are fixed by the arguments: planned
    posattn.apply_rope(q, k, pos, spec, seq_len=100)
    assert len(plans.PLANS) == 1


def test_positions_changed_in_place_are_seen(monkeypatch):
    """The plan keeps the last positions view: values, storage and strides changed in place
    must still be read correctly."""
    q, k, _ = _inputs()
    pos = torch.arange(5, device=DEVICE)
    posattn.apply_rope(q, k, pos, SPEC)
    pos.add_(7)  # new values, same storage
    _same(posattn.apply_rope(q, k, pos, SPEC)[0], _uncached(monkeypatch, q, k, pos.clone(), SPEC)[0])
    pos.set_(torch.arange(100, 105, device=DEVICE))  # new storage
    _same(posattn.apply_rope(q, k, pos, SPEC)[0], _uncached(monkeypatch, q, k, pos.clone(), SPEC)[0])
    base = torch.arange(10, device=DEVICE)
    pos.set_(base.untyped_storage(), 0, (5,), (2,))  # other strides (even positions)
    _same(posattn.apply_rope(q, k, pos, SPEC)[0], _uncached(monkeypatch, q, k, base[::2].clone(), SPEC)[0])
    pos.set_(base.untyped_storage(), 1, (5,), (2,))  # other offset (odd positions)
    _same(posattn.apply_rope(q, k, pos, SPEC)[0], _uncached(monkeypatch, q, k, base[1::2].clone(), SPEC)[0])


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("with_k", [True, False], ids=["k", "no_k"])
def test_identical_with_and_without_plans(monkeypatch, layout, strided, inplace, with_k):
    q, k, pos = _inputs(layout)
    if strided:  # last dim not contiguous: the op copies, runs, (copies back when in place)
        q = torch.stack([q, q], -1)[..., 0]
        k = torch.stack([k, k], -1)[..., 0]
    k = k if with_k else None
    for _ in range(2):  # the first call makes the plan, the second runs it
        qa, ka = q.clone(), (k.clone() if k is not None else None)
        qb, kb = q.clone(), (k.clone() if k is not None else None)
        got = posattn.apply_rope(qa, ka, pos, SPEC, layout=layout, inplace=inplace)
        want = _uncached(monkeypatch, qb, kb, pos, SPEC, layout=layout, inplace=inplace)
        for g, w in zip(got, want):
            _same(g, w)
        if inplace:
            assert got[0] is qa and got[1] is ka
            _same(qa, qb)
            _same(ka, kb)
    assert len(plans.PLANS) == 1


# ---------------------------------------------------------------------------
# apply_rope_cos_sin's plans (posattn/rope/cos_sin.py)

from posattn.rope import cos_sin as CS  # noqa: E402
from tests.rope import test_cos_sin as TC  # noqa: E402


@pytest.fixture
def cs_fresh():
    CS.clear_plans()
    yield
    CS.clear_plans()


def _cs_uncached(monkeypatch, *args, **kw):
    return _without_plans(CS, CS._PLANS, posattn.apply_rope_cos_sin, monkeypatch, *args, **kw)


def _cs_case(form, layout):
    q, k, _ = _inputs(layout)
    S = 5
    if form == "cache":
        cache = torch.randn(12, 24, device=DEVICE)
        return (q, k), {"cos_sin_cache": cache, "positions": torch.randint(0, 12, (S,), device=DEVICE)}
    ang = torch.rand(S, 12, device=DEVICE) * 6
    if form == "full":
        ang = torch.cat([ang, ang], -1)
    return (q, k, ang.cos(), ang.sin()), {}


@pytest.mark.parametrize("form", ["half", "full", "cache"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_cos_sin_identical_with_and_without_plans(monkeypatch, cs_fresh, form, layout, inplace, strided):
    args, kw = _cs_case(form, layout)
    q, k = args[:2]
    if strided:
        q = torch.stack([q, q], -1)[..., 0]
        k = torch.stack([k, k], -1)[..., 0]
    for _ in range(2):  # the first call makes the plan, the second runs it
        qa, ka, qb, kb = q.clone(), k.clone(), q.clone(), k.clone()
        got = posattn.apply_rope_cos_sin(qa, ka, *args[2:], layout=layout, inplace=inplace, **kw)
        want = _cs_uncached(monkeypatch, qb, kb, *args[2:], layout=layout, inplace=inplace, **kw)
        for g, w in zip(got, want):
            _same(g, w)
        if inplace:
            assert got[0] is qa and got[1] is ka
    assert len(CS._PLANS) == 1
    # no k: a fresh plan, k_out None
    got = posattn.apply_rope_cos_sin(q, None, *args[2:], layout=layout, **kw)
    assert got[1] is None and len(CS._PLANS) == 2
    _same(got[0], _cs_uncached(monkeypatch, q, None, *args[2:], layout=layout, **kw)[0])


def test_cos_sin_bounds_checked_on_every_call(cs_fresh):
    args, kw = _cs_case("cache", "bshd")
    posattn.apply_rope_cos_sin(*args, **kw)
    assert len(CS._PLANS) == 1
    bad = torch.tensor([0, 1, 12, 2, 3], device=DEVICE)  # same signature, a value out of range
    with pytest.raises(ValueError, match="got a position 12"):
        posattn.apply_rope_cos_sin(*args, cos_sin_cache=kw["cos_sin_cache"], positions=bad)
    assert len(CS._PLANS) == 1
    kw["positions"].fill_(-1)  # the kept positions view, changed in place
    with pytest.raises(ValueError, match="got a position -1"):
        posattn.apply_rope_cos_sin(*args, **kw)


def test_cos_sin_tables_changed_in_place_are_seen(monkeypatch, cs_fresh):
    (q, k, cos, sin), _ = _cs_case("half", "bshd")
    posattn.apply_rope_cos_sin(q, k, cos, sin)
    cos.mul_(0.5)
    _same(posattn.apply_rope_cos_sin(q, k, cos, sin)[0], _cs_uncached(monkeypatch, q, k, cos.clone(), sin.clone())[0])
    wide = torch.randn(5, 24, device=DEVICE)
    cos.set_(wide.untyped_storage(), 0, (5, 12), (24, 1))  # other storage and strides
    _same(posattn.apply_rope_cos_sin(q, k, cos, sin)[0],
          _cs_uncached(monkeypatch, q, k, wide[:, :12].clone(), sin.clone())[0])
    # other table objects with the same signature
    c2, s2 = cos.clone() + 1, sin.clone()
    _same(posattn.apply_rope_cos_sin(q, k, c2, s2)[0], _cs_uncached(monkeypatch, q, k, c2, s2)[0])
    assert len(CS._PLANS) == 1


def test_cos_sin_grad_and_clear(cs_fresh):
    (q, k, cos, sin), _ = _cs_case("half", "bshd")
    posattn.apply_rope_cos_sin(q, k, cos, sin)
    qg = q.clone().requires_grad_()
    qo, _ = posattn.apply_rope_cos_sin(qg, k, cos, sin)
    assert qo.grad_fn is not None
    assert len(CS._PLANS) == 1
    dispatch.clear_memo()
    assert not CS._PLANS


@pytest.mark.parametrize("case, exc, match", TC.test_bad_inputs.pytestmark[-1].args[1])
def test_cos_sin_bad_inputs_raise_with_plans_warm(cs_fresh, case, exc, match):
    q, k, cos, sin = TC._ok()
    posattn.apply_rope_cos_sin(q, k, cos, sin)
    posattn.apply_rope_cos_sin(q, k, cos, sin, inplace=False, backend="reference")
    assert CS._PLANS
    TC.test_bad_inputs(case, exc, match)


@pytest.mark.parametrize("kw, exc, match", [
    ({"inplace": 0}, TypeError, "inplace must be a bool"),
    ({"interleaved": 0}, TypeError, "interleaved must be a bool"),
    ({"check_bounds": 1}, TypeError, "check_bounds must be a bool"),
    ({"rotary_dim": 24.0}, TypeError, "rotary_dim must be an int"),
    ({"layout": ["bshd"]}, ValueError, "layout must be one of"),
])
def test_cos_sin_equal_hashing_arguments_are_still_checked(cs_fresh, kw, exc, match):
    (q, k, cos, sin), _ = _cs_case("half", "bshd")
    posattn.apply_rope_cos_sin(q, k, cos, sin, inplace=False, interleaved=False, check_bounds=True)
    posattn.apply_rope_cos_sin(q, k, cos, sin, rotary_dim=24)
    with pytest.raises(exc, match=match):
        posattn.apply_rope_cos_sin(q, k, cos, sin, **kw)


def test_cos_sin_cache_is_bounded(monkeypatch, cs_fresh):
    monkeypatch.setattr(CS, "PLAN_CACHE_SIZE", 3)
    for s in range(1, 9):
        q = torch.randn(1, s, 2, 32, device=DEVICE)
        ang = torch.rand(s, 16, device=DEVICE)
        posattn.apply_rope_cos_sin(q, None, ang.cos(), ang.sin())
        assert 1 <= len(CS._PLANS) <= 3


def test_cos_sin_cache_plan_warm_still_rejects_cos_and_sin_too(cs_fresh):
    args, kw = _cs_case("cache", "bshd")
    posattn.apply_rope_cos_sin(*args, **kw)
    assert len(CS._PLANS) == 1
    ang = torch.rand(5, 12, device=DEVICE)
    for cos, sin in ((ang.cos(), ang.sin()), (ang.cos(), None), (None, ang.sin())):
        with pytest.raises(ValueError, match="not both"):
            posattn.apply_rope_cos_sin(*args, cos, sin, **kw)


# ---------------------------------------------------------------------------
# the prepared CPU launchers the plans call (Kernel.prepare; csrc/bind_cpu.cpp)

from posattn.kernels import cpu as cpu_kernels  # noqa: E402
from posattn.kernels import native  # noqa: E402
from posattn.kernels import rope_cos_sin_native as cs_native  # noqa: E402

needs_cpu_kernels = pytest.mark.skipif(DEVICE != "cpu" or not cpu_kernels.status()[0],
                                       reason="the C++ CPU kernels run on CPU tensors")


@needs_cpu_kernels
def test_plans_run_the_prepared_cpu_launchers(monkeypatch, cs_fresh):
    q, k, pos = _inputs()
    posattn.apply_rope(q, k, pos, SPEC, backend="cpu")
    posattn.apply_rope(q, k, pos, SPEC, backend="cpu")
    (plan,) = plans.PLANS.values()
    assert plan.kernel.prepare is cpu_kernels.rope_prepare
    assert plan.launch is not None and plan.launch.__qualname__.startswith("_prepare.")
    args, kw = _cs_case("cache", "bshd")
    posattn.apply_rope_cos_sin(*args, backend="cpu", **kw)
    posattn.apply_rope_cos_sin(*args, backend="cpu", **kw)
    (cs_plan,) = CS._PLANS.values()
    assert cs_plan.launch is not None and cs_plan.launch.__qualname__.startswith("cpu_prepare")
    # a launcher prepared on one set of tensors rotates others of the same signature exactly
    q2, k2, pos2 = _inputs()
    got = posattn.apply_rope(q2, k2, pos2, SPEC, backend="cpu")
    want = _uncached(monkeypatch, q2, k2, pos2, SPEC, backend="cpu")
    for g, w in zip(got, want):
        _same(g, w)


@needs_cpu_kernels
def test_prepared_rope_launcher_rejects_what_the_signature_rules_out():
    q, k, pos = _inputs()
    qo = torch.empty_like(q)
    tables = SPEC.tables(q.device)
    pos3 = pos[None, None]
    launch = cpu_kernels._C.RopeLaunch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 24, False, True),
                                       native.pos_args(pos3), native.freq_args(tables), 1.0, [], 1.0,
                                       native.DTYPE_CODE[q.dtype], 16)
    pa = native.pos_args(pos3)
    launch(q.data_ptr(), qo.data_ptr(), 0, 0, pa, 1)  # k absent in the signature: its pointers unused
    want = _uncached(pytest.MonkeyPatch(), q, None, pos, SPEC, backend="cpu")[0]
    _same(qo, want)
    with pytest.raises(ValueError, match="q: null pointer"):
        launch(0, qo.data_ptr(), 0, 0, pa, 1)
    with pytest.raises(ValueError, match="dtype differs"):
        launch(q.data_ptr(), qo.data_ptr(), 0, 0, native.pos_args(pos3.int()), 1)
    with pytest.raises(ValueError, match="pos: expected 5 integers"):
        launch(q.data_ptr(), qo.data_ptr(), 0, 0, pa[:4], 1)
    with pytest.raises(ValueError, match="pos: expected 5 integers"):  # neither positions nor angles
        cpu_kernels._C.RopeLaunch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 24, False, True),
                                  [], [], 1.0, [], 1.0, native.DTYPE_CODE[q.dtype], 16)
    # prepared with explicit angles: a call passes angle arguments with the prepared row count
    ang = torch.rand(1, 5, 3, 12)
    alaunch = cpu_kernels._C.RopeLaunch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 24, False, True),
                                        [], [], 1.0, native.angle_args(ang), 1.0, native.DTYPE_CODE[q.dtype], 16)
    alaunch(q.data_ptr(), qo.data_ptr(), 0, 0, native.angle_args(ang), 1)
    want = posattn.apply_rope_angles(q, None, ang, backend="reference")[0]
    torch.testing.assert_close(qo, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="angles: rows differ"):
        alaunch(q.data_ptr(), qo.data_ptr(), 0, 0, native.angle_args(ang[:, :, :1]), 1)


@needs_cpu_kernels
def test_prepared_cos_sin_launcher_rejects_what_the_signature_rules_out():
    q, _, _ = _inputs()
    qo = torch.empty_like(q)
    cache = torch.randn(12, 24)
    pos2 = torch.randint(0, 12, (1, 5))
    views = CS._table_views(cache, cache, 24, CS.FORM_CACHE, False, False)
    run = cs_native.cpu_prepare(q, qo, None, None, *views, pos2, 24, False, 1.0, {"threads": 1})
    run(q, qo, None, None, views, pos2)
    want = posattn.apply_rope_cos_sin(q, None, cos_sin_cache=cache, positions=pos2[0], backend="reference")[0]
    torch.testing.assert_close(qo, want, rtol=0, atol=1e-6)
    common = cs_native._common(q, qo, None, None, *views, pos2, 24, False, 1.0)
    launch = cs_native._C.CosSinLaunch(*common, 16)
    ta, pa = common[2], common[3]
    with pytest.raises(ValueError, match="presence or dtype differs"):
        launch(q.data_ptr(), qo.data_ptr(), 0, 0, ta, [], 1)
    with pytest.raises(ValueError, match="presence or dtype differs"):
        launch(q.data_ptr(), qo.data_ptr(), 0, 0, ta, cs_native._pos_args(pos2.int()), 1)
    with pytest.raises(ValueError, match="rows differ"):
        launch(q.data_ptr(), qo.data_ptr(), 0, 0, ta[:10] + [11], pa, 1)
    with pytest.raises(ValueError, match="q: null pointer"):
        launch(0, qo.data_ptr(), 0, 0, ta, pa, 1)


# ---------------------------------------------------------------------------
# apply_rope_angles' plans (the same _RopePlan, angles in place of positions)

from tests.rope import test_rope_angles as TA  # noqa: E402


def _ang_uncached(monkeypatch, *args, **kw):
    return _without_plans(plans, plans.ANGLE_PLANS, posattn.apply_rope_angles, monkeypatch, *args, **kw)


def _angles(layout, B=2, S=5, rows=1, half=12, dtype=torch.float32):
    shape = (S, rows, half) if layout == "thd" else (B, S, rows, half)
    return torch.rand(shape, dtype=dtype, device=DEVICE) * 6


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("ang_form", ["fp32", "fp64", "shared_rows", "last_dim_strided"])
def test_angles_identical_with_and_without_plans(monkeypatch, layout, strided, inplace, ang_form):
    q, k, _ = _inputs(layout)
    if strided:
        q = torch.stack([q, q], -1)[..., 0]
        k = torch.stack([k, k], -1)[..., 0]
    if ang_form == "fp64":
        ang = _angles(layout, dtype=torch.float64)
    elif ang_form == "shared_rows" and layout != "thd":
        ang = _angles("thd")  # [S, 1, R/2] shared by the batch
    elif ang_form == "last_dim_strided":
        ang = torch.stack([_angles(layout)] * 2, -1)[..., 0]
    else:
        ang = _angles(layout)
    for _ in range(2):  # the first call makes the plan, the second runs it
        qa, ka, qb, kb = q.clone(), k.clone(), q.clone(), k.clone()
        got = posattn.apply_rope_angles(qa, ka, ang, layout=layout, inplace=inplace)
        want = _ang_uncached(monkeypatch, qb, kb, ang, layout=layout, inplace=inplace)
        for g, w in zip(got, want):
            _same(g, w)
        if inplace:
            assert got[0] is qa and got[1] is ka
    assert len(plans.ANGLE_PLANS) == 1
    # angles changed in place, and other angle tensors of the same signature, are read afresh
    # (q.clone(): the loop's signature; cloning a strided q makes it dense)
    ang.mul_(0.5)
    _same(posattn.apply_rope_angles(q.clone(), k.clone(), ang, layout=layout, inplace=inplace)[0],
          _ang_uncached(monkeypatch, q.clone(), k.clone(), ang.clone(), layout=layout, inplace=inplace)[0])
    assert len(plans.ANGLE_PLANS) == 1
    a2 = ang.clone() + 1
    _same(posattn.apply_rope_angles(q.clone(), None, a2, layout=layout, inplace=inplace)[0],
          _ang_uncached(monkeypatch, q.clone(), None, a2, layout=layout, inplace=inplace)[0])
    assert len(plans.ANGLE_PLANS) == 2  # with and without k


def test_angles_restrided_in_place_are_seen(monkeypatch):
    q, k, _ = _inputs()
    ang = _angles("bshd")
    posattn.apply_rope_angles(q, k, ang)
    wide = torch.rand(2, 5, 1, 24, device=DEVICE)
    ang.set_(wide.untyped_storage(), 0, (2, 5, 1, 12), (120, 24, 24, 1))  # other storage and strides
    _same(posattn.apply_rope_angles(q, k, ang)[0], _ang_uncached(monkeypatch, q, k, wide[..., :12].clone())[0])
    assert len(plans.ANGLE_PLANS) == 1


def test_angles_grad_bypasses_plans():
    q, k, _ = _inputs()
    ang = _angles("bshd")
    posattn.apply_rope_angles(q, k, ang)
    assert len(plans.ANGLE_PLANS) == 1
    ag = ang.clone().requires_grad_()
    qo, _ = posattn.apply_rope_angles(q, k, ag)
    assert qo.grad_fn is not None
    assert len(plans.ANGLE_PLANS) == 1
    dispatch.clear_memo()
    assert not plans.ANGLE_PLANS


@pytest.mark.parametrize("case, exc, match", TA.test_bad_inputs.pytestmark[-1].args[1])
def test_angles_bad_inputs_raise_with_plans_warm(case, exc, match):
    q, k = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 2, 64)
    posattn.apply_rope_angles(q, k, torch.randn(2, 3, 1, 16))
    posattn.apply_rope_angles(q, k, torch.randn(2, 3, 1, 16), backend="reference")
    assert plans.ANGLE_PLANS
    TA.test_bad_inputs(case, exc, match)


# ---------------------------------------------------------------------------
# rope_shift's plans (linear position maps: k rotated in the query role by the delta alone)

from tests.rope import test_rope_shift as TS  # noqa: E402


def _shift_uncached(monkeypatch, *args, **kw):
    return _without_plans(plans, plans.SHIFT_PLANS, posattn.rope_shift, monkeypatch, *args, **kw)


SHIFT_SPECS = {
    "plain": posattn.RopeSpec(32, rotary_dim=24),
    "yarn_interleaved": posattn.RopeSpec(32, interleaved=True, scaling=posattn.YaRN(4.0, 4096)),
    "mrope": posattn.RopeSpec(32, mrope_section=(4, 6, 6)),
}


def _shift_deltas(S, B):
    return {
        "int": 7,
        "negative_int": -3,
        "float": 2.5,
        "tensor_S": torch.randint(-50, 50, (S,), device=DEVICE).to(torch.int32),
        "tensor_BS_float": torch.rand(B, S, device=DEVICE) * 8 - 4,
    }


@pytest.mark.parametrize("spec_name", list(SHIFT_SPECS))
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("layout, delta_name", [(lay, d) for lay in ("bshd", "bhsd", "thd") for d in _shift_deltas(5, 2)
                                                if not (lay == "thd" and d == "tensor_BS_float")])  # thd: [T] deltas
def test_shift_identical_with_and_without_plans(monkeypatch, spec_name, layout, strided, inplace, delta_name):
    spec = SHIFT_SPECS[spec_name]
    _, k, _ = _inputs(layout, HK=2)
    if strided:
        k = torch.stack([k, k], -1)[..., 0]
    delta = _shift_deltas(5, 2)[delta_name]
    planned = not isinstance(delta, torch.Tensor) or spec.mrope_section is None
    for _ in range(2):  # the first call makes the plan, the second runs it
        ka, kb = k.clone(), k.clone()
        got = posattn.rope_shift(ka, delta, spec, layout=layout, inplace=inplace)
        want = _shift_uncached(monkeypatch, kb, delta, spec, layout=layout, inplace=inplace)
        _same(got, want)
        if inplace:
            assert got is ka
    assert len(plans.SHIFT_PLANS) == (1 if planned else 0)
    if not isinstance(delta, torch.Tensor):  # another value: the same plan
        got = posattn.rope_shift(k.clone(), delta * 3 + 1, spec, layout=layout, inplace=inplace)
        _same(got, _shift_uncached(monkeypatch, k.clone(), delta * 3 + 1, spec, layout=layout, inplace=inplace))
        assert len(plans.SHIFT_PLANS) == 1
    else:  # the delta changed in place
        delta.add_(1)
        got = posattn.rope_shift(k.clone(), delta, spec, layout=layout, inplace=inplace)
        _same(got, _shift_uncached(monkeypatch, k.clone(), delta.clone(), spec, layout=layout, inplace=inplace))


def test_shift_plans_cover_types_and_bypass_grad_and_huge_ints(monkeypatch):
    spec = SHIFT_SPECS["plain"]
    _, k, _ = _inputs()
    posattn.rope_shift(k, 3, spec)
    posattn.rope_shift(k, 3.0, spec)   # int and float deltas: two signatures
    posattn.rope_shift(k, 3, spec, backend="reference")
    assert len(plans.SHIFT_PLANS) == 3
    _same(posattn.rope_shift(k, 5, spec, backend="reference"), _shift_uncached(monkeypatch, k, 5, spec, backend="reference"))
    big = 1 << 60  # not exact as a float64 position: the checked path (int64 positions)
    _same(posattn.rope_shift(k, big, spec), _shift_uncached(monkeypatch, k, big, spec))
    kg = k.clone().requires_grad_()
    out = posattn.rope_shift(kg, 3, spec)
    assert out.grad_fn is not None
    posattn.rope_shift(k, torch.tensor(2), spec)  # a 0-d delta: checked path
    assert len(plans.SHIFT_PLANS) == 3
    dispatch.clear_memo()
    assert not plans.SHIFT_PLANS


@pytest.mark.parametrize("case, exc, match", TS.test_bad_inputs.pytestmark[-1].args[1])
def test_shift_bad_inputs_raise_with_plans_warm(case, exc, match):
    k = torch.randn(2, 3, 2, 32)
    posattn.rope_shift(k, 1, posattn.RopeSpec(32))
    posattn.rope_shift(k, torch.ones(3, dtype=torch.long), posattn.RopeSpec(32))
    assert len(plans.SHIFT_PLANS) == 2
    TS.test_bad_inputs(case, exc, match)


@pytest.mark.parametrize("kw, exc, match", [
    ({"inplace": 0}, TypeError, "inplace must be a bool"),
    ({"layout": ["bshd"]}, ValueError, "layout must be one of"),
    ({"seq_len": 0}, ValueError, "seq_len must be a positive int"),
])
def test_shift_arguments_still_checked_with_plans_warm(kw, exc, match):
    k = torch.randn(2, 3, 2, 32)
    posattn.rope_shift(k, 1, posattn.RopeSpec(32))
    with pytest.raises(exc, match=match):
        posattn.rope_shift(k, 1, posattn.RopeSpec(32), **kw)
    with pytest.raises(TypeError, match="delta must be an int, a float or a tensor"):
        posattn.rope_shift(k, True, posattn.RopeSpec(32))

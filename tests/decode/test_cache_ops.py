"""rope_and_cache on every backend vs an fp64 oracle (independent of the posattn reference
kernels: tests/rope/_rope_helpers.oracle); both cache ops without host sync, under
torch.compile and opcheck (kv_compact's own tests: test_cache_ops_compact.py)."""
from __future__ import annotations

import pytest
import torch

import posattn
from posattn.rope.scaling import YaRN
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.rope._rope_helpers import TableSpec, make_tables, oracle

# the CUDA C++ kernels (by name only, not verified on a GPU) run in tests/kernels/test_cache_cuda.py,
# outside tests/decode, whose GPU run stops at the first failure
BACKENDS = [b for b in usable_backends("rope_and_cache") if b != "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _spec(kind, D, rotary_dim, interleaved, HK):
    if kind == "yarn":
        return posattn.RopeSpec(D, rotary_dim, interleaved=interleaved,
                                scaling=YaRN(factor=4.0, original_max_position=64))
    return TableSpec(D, rotary_dim, interleaved=interleaved, fixed=make_tables(kind, rotary_dim, HK))


def _expected(q, k, v, positions, spec, k_cache, v_cache, slots, layout, rotate_k):
    """fp64: the rotated q and the caches after the write (NHD-ordered views)."""
    qo, ko = oracle(q, k, positions.cpu(), spec, layout="thd", tables=spec.tables("cpu"))
    kc = (k_cache if layout == "NHD" else k_cache.transpose(1, 2)).double().cpu().clone()
    vc = (v_cache if layout == "NHD" else v_cache.transpose(1, 2)).double().cpu().clone()
    kin = ko if rotate_k else k.double().cpu()
    page = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // page, s % page] = kin[t].to(k.dtype).double()
            vc[s // page, s % page] = v[t].double().cpu()
    return qo, kc, vc


CASES = [  # (kind, D, rotary_dim, interleaved, T, HQ, HK, page, kv_layout, rotate_k, pos dtype)
    ("plain", 64, 64, False, 7, 6, 3, 4, "NHD", True, torch.int64),
    ("scaled", 80, 80, True, 5, 3, 3, 16, "HND", True, torch.int32),
    ("mrope", 96, 64, False, 3, 4, 2, 1, "NHD", True, torch.int64),
    ("perhead", 64, 64, False, 4, 4, 2, 2, "NHD", True, torch.float32),
    ("dpe", 80, 40, True, 6, 2, 1, 8, "HND", True, torch.float64),
    ("yarn", 64, 32, False, 5, 2, 2, 4, "NHD", False, torch.int64),
]


def _params():
    for backend in BACKENDS:
        # the interpreter is slow: Triton runs fp32 and fp16 (bf16 shares their code path)
        dtypes = DTYPES[:2] if backend == "triton" else DTYPES + [torch.float64]
        for case in CASES:
            for dtype in dtypes:
                marks = ()
                if backend == "cpu" and dtype == torch.float64 and case[0] == "yarn":
                    # the shared rotary C++ path keeps attention_scaling as a float
                    # (RopeFreqs::attention_scaling in rope_math.h): fp64 outputs with a
                    # scaling != 1 are off by ~1e-9, so apply_rope(backend="cpu") is too
                    marks = (pytest.mark.xfail(strict=True, reason="fp32 attention_scaling in rope_math.h"),)
                yield pytest.param(backend, case, dtype, marks=marks,
                                   id=f"{backend}-{case[0]}-d{case[1]}-{case[8]}-{'rot' if case[9] else 'raw'}-"
                                      f"{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,case,dtype", list(_params()))
def test_rope_and_cache_matches_oracle(backend, case, dtype):
    kind, D, R, inter, T, HQ, HK, page, layout, rotate_k, pdt = case
    spec = _spec(kind, D, R, inter, HK)
    if True:
        q = torch.randn(T, HQ, D, dtype=dtype, device=DEVICE)
        k = torch.randn(T, HK, D, dtype=dtype, device=DEVICE)
        v = torch.randn(T, HK, 48, dtype=dtype, device=DEVICE)
        nblk = 3 + T // page
        shape_k = (nblk, page, HK, D) if layout == "NHD" else (nblk, HK, page, D)
        shape_v = (nblk, page, HK, 48) if layout == "NHD" else (nblk, HK, page, 48)
        k_cache = torch.randn(shape_k, dtype=dtype, device=DEVICE)
        v_cache = torch.randn(shape_v, dtype=dtype, device=DEVICE)
        slots = torch.randperm(nblk * page)[:T].to(DEVICE)
        slots[T // 2] = -1                                   # a padding token: nothing written
        n_axes = 3 if kind == "mrope" else 1
        shape = (n_axes, T) if n_axes > 1 else (T,)
        if pdt.is_floating_point:
            positions = (torch.rand(shape) * 5000).to(pdt)
        else:
            positions = torch.randint(0, 5000, shape, dtype=pdt)
        positions = positions.to(DEVICE)
        eq, ekc, evc = _expected(q, k, v, positions, spec, k_cache, v_cache, slots, layout, rotate_k)
        qo = posattn.rope_and_cache(q, k, v, positions, spec, k_cache, v_cache, slots, kv_layout=layout,
                                    rotate_k=rotate_k, backend=backend)
        assert qo.shape == q.shape and qo.dtype == dtype
        assert_close(qo, eq, dtype, msg=f"{backend} {dtype} q")
        kc = k_cache if layout == "NHD" else k_cache.transpose(1, 2)
        vc = v_cache if layout == "NHD" else v_cache.transpose(1, 2)
        assert_close(kc, ekc, dtype, msg=f"{backend} {dtype} k_cache")
        assert torch.equal(vc.double().cpu(), evc), f"{backend} {dtype} v_cache"


def test_rope_and_cache_plan_reuse_and_contiguous_cache():
    """A second call of one signature runs its plan with the new tensors; a contiguous
    [B, S_cap, Hk, D] cache is NHD with page_size = S_cap."""
    spec = posattn.RopeSpec(64)
    B, S_cap, HK = 2, 8, 2
    kc = torch.zeros(B, S_cap, HK, 64)
    vc = torch.zeros(B, S_cap, HK, 64)
    for step in range(2):
        q, k, v = torch.randn(B, 4, 64), torch.randn(B, HK, 64), torch.randn(B, HK, 64)
        pos = torch.tensor([3 + step, 5 + step])
        slots = torch.arange(B) * S_cap + pos
        qo = posattn.rope_and_cache(q, k, v, pos, spec, kc, vc, slots, backend="cpu")
        eq, ek = oracle(q, k, pos, spec, layout="thd")
        assert_close(qo, eq, torch.float32)
        for b in range(B):
            assert_close(kc[b, int(pos[b])], ek[b], torch.float32)
            assert torch.equal(vc[b, int(pos[b])], v[b])


def _bad_inputs():
    spec = posattn.RopeSpec(64)
    q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    kc, vc = torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64)
    pos, slots = torch.arange(3), torch.arange(3)
    base = dict(q=q, k=k, v=v, positions=pos, spec=spec, k_cache=kc, v_cache=vc, slot_mapping=slots)
    return base, [
        (dict(slot_mapping=slots.int()), TypeError, "slot_mapping must be int64"),
        (dict(slot_mapping=torch.tensor([0, 8, 1])), ValueError, "slot_mapping values"),
        (dict(slot_mapping=torch.tensor([0, -2, 1])), ValueError, "slot_mapping values"),
        (dict(slot_mapping=torch.arange(2)), ValueError, "same token count"),
        (dict(k_cache=torch.zeros(2, 4, 2, 64), v_cache=torch.zeros(2, 4, 2, 64)), ValueError, "k_cache must hold"),
        (dict(k_cache=kc.half()), TypeError, "k_cache must have"),
        (dict(v=v[:, :, :32]), ValueError, "v_cache must hold"),
        (dict(k=k.half()), TypeError, "share one dtype"),
        (dict(k=torch.randn(3, 2, 64), v=torch.randn(3, 2, 64)), ValueError, "k_cache must hold"),
        (dict(q=torch.randn(3, 3, 64), k=torch.randn(3, 2, 64), v=torch.randn(3, 2, 64)), ValueError,
         "multiple of k's"),
        (dict(positions=torch.arange(4)), ValueError, "positions"),
        (dict(spec=posattn.RopeSpec(32)), ValueError, "spec.head_dim"),
        (dict(k_cache=torch.zeros(2, 4, 1, 64, device="meta")), ValueError, "on meta"),
        (dict(q=q.long()), TypeError, "q must be float"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_inputs()[1])))
def test_rope_and_cache_bad_input(i):
    base, cases = _bad_inputs()
    change, exc, msg = cases[i]
    args = {**base, **change}
    before = args["k_cache"].clone() if args["k_cache"].device.type == "cpu" else None
    with pytest.raises(exc, match=msg):
        posattn.rope_and_cache(**args)
    if before is not None:
        assert torch.equal(args["k_cache"], before), "nothing may be written before the error"


def test_rope_and_cache_bad_kv_layout():
    base, _ = _bad_inputs()
    with pytest.raises(ValueError, match="kv_layout"):
        posattn.rope_and_cache(**base, kv_layout="nhd")


# ---------------------------------------------------------------------------
# no host sync on the planned path; torch.compile(fullgraph=True)

def test_no_host_sync():
    from tests.tree.test_verify import _NoSync

    spec = posattn.RopeSpec(64)
    kc, vc = torch.zeros(3, 4, 1, 64, device=DEVICE), torch.zeros(3, 4, 1, 64, device=DEVICE)
    args = lambda: (torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 1, 64, device=DEVICE),  # noqa: E731
                    torch.randn(3, 1, 64, device=DEVICE), torch.arange(3, device=DEVICE), spec, kc, vc,
                    torch.tensor([5, -1, 2], device=DEVICE))
    posattn.rope_and_cache(*args(), check=False)              # plans the signature
    lens = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    src, counts = torch.tensor([[2, 3], [1, 2]], device=DEVICE), torch.tensor([2, 1], device=DEVICE)
    with _NoSync():
        posattn.rope_and_cache(*args(), check=False)
        posattn.kv_compact(kc, vc, lens, src, counts, block_table=torch.tensor([[0], [1]], dtype=torch.int32,
                                                                                device=DEVICE), check=False)
    assert lens.tolist() == [3, 1]


def test_torch_compile_fullgraph():
    spec = posattn.RopeSpec(64, scaling=YaRN(factor=2.0, original_max_position=64))   # first use under compile
    q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    pos, slots = torch.arange(3), torch.tensor([5, -1, 2])

    def f(kc, vc, lens, src, counts):
        qo = posattn.rope_and_cache(q, k, v, pos, spec, kc, vc, slots)       # check=None: no value reads
        posattn.kv_compact(kc, vc, lens, src, counts)
        return qo * 2, lens + 0

    def state():
        kc = torch.randn(2, 8, 1, 64)
        return kc, kc.clone() + 1, torch.tensor([1, 0], dtype=torch.int32), torch.tensor([[5, 6], [1, 2]]), \
            torch.tensor([2, 1])

    torch.manual_seed(3)
    a = state()
    out_c = torch.compile(f, fullgraph=True)(*a)
    torch.manual_seed(3)
    b = state()
    out_e = f(*b)
    assert torch.equal(out_c[0], out_e[0]) and torch.equal(out_c[1], out_e[1])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_cache_strided_positions_and_slots(backend):
    """positions and slot_mapping that are strided views (a column of a [T, 2] tensor)."""
    spec = posattn.RopeSpec(64)
    T = 5
    q = torch.randn(T, 2, 64, device=DEVICE)
    k, v = torch.randn(T, 1, 64, device=DEVICE), torch.randn(T, 1, 64, device=DEVICE)
    pos = torch.randint(0, 3000, (T, 2), device=DEVICE)[:, 1]
    slots = torch.stack((torch.arange(T), torch.randperm(12)[:T]), 1).to(DEVICE)[:, 1]
    assert pos.stride(0) == 2 and slots.stride(0) == 2
    for _ in range(2):       # checked path, then the plan
        kc, vc = torch.zeros(3, 4, 1, 64, device=DEVICE), torch.zeros(3, 4, 1, 64, device=DEVICE)
        eq, ekc, evc = _expected(q, k, v, pos, spec, kc, vc, slots, "NHD", True)
        qo = posattn.rope_and_cache(q, k, v, pos, spec, kc, vc, slots, backend=backend)
        assert_close(qo, eq, torch.float32)
        assert_close(kc, ekc, torch.float32)
        assert torch.equal(vc.double().cpu(), evc)


def test_tuner_adapter_checks_candidates():
    """posattn/autotune/ops_cache.py: the reference check accepts the CPU kernel and rejects a
    kernel that writes nothing (its outputs stay NaN) or writes the keys unrotated."""
    from posattn import dispatch
    from posattn.autotune import ops_cache
    from posattn.decode.cache import CacheKey

    key = CacheKey("cpu", "float32", 64, 64, 4, 2, 1, 1, False, True, 32)
    kernel = dispatch.kernels("rope_and_cache")["cpu"]
    x = ops_cache.make_inputs(key, "cpu", 1)
    assert ops_cache.reference_check(key, x, lambda: ops_cache.run(kernel, {}, x)) is None
    assert "non-finite" in ops_cache.reference_check(key, x, lambda: None)
    raw = lambda: kernel.fn(x["q"], x["qo"], x["k"], x["v"], x["kc"], x["vc"], x["slots"], x["pos3"],  # noqa: E731
                            x["tables"], 64, False, False, {})
    assert "k output differs" in ops_cache.reference_check(key, x, raw)


def test_custom_ops_opcheck():
    """The torch.library ops: schema (mutated caches and lengths declared), fake impls, AOT dispatch."""
    spec = posattn.RopeSpec(64)
    t = spec.tables("cpu")
    q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    kc, vc = torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64)
    args = (q, k, v, kc, vc, torch.tensor([5, -1, 2]), torch.arange(3).view(1, 1, 3), t.inv_freq, None, None, None,
            1.0, 64, False, True, False, "cpu")
    torch.library.opcheck(torch.ops.posattn.rope_and_cache.default, args)
    kc2 = torch.randn(2, 6, 1, 8)
    args = (kc2, kc2.clone(), torch.tensor([1, 0], dtype=torch.int32), torch.tensor([[2, 4], [1, 2]]),
            torch.tensor([2, 1]), None, False, "cpu")
    torch.library.opcheck(torch.ops.posattn.kv_compact.default, args)



@pytest.mark.parametrize("i", range(len(_bad_inputs()[1])))
def test_rope_and_cache_bad_input_after_a_plan(i):
    """A bad call whose shapes match a planned signature is still refused (the plan's key
    covers every input's dtype, device and layout, not only the shapes)."""
    base, cases = _bad_inputs()
    posattn.rope_and_cache(**base)                      # plans the good signature
    change, exc, msg = cases[i]
    args = {**base, **change}
    if args["k_cache"].device.type == "meta":
        pytest.skip("the meta-device case has no planned twin")
    before = args["k_cache"].clone()
    with pytest.raises(exc, match=msg):
        posattn.rope_and_cache(**args)
    assert torch.equal(args["k_cache"], before)


def test_posattn_tune_builds_rope_and_cache_keys():
    """`posattn tune --ops rope_and_cache` builds one key per token bucket of a preset's shape."""
    from posattn.autotune import keys, shapes

    assert "rope_and_cache" in keys.ops()
    from posattn.autotune import presets

    shape = shapes.model_shape(presets.get("llama3-8b"), "preset llama3-8b")
    ks = keys.keys_for("rope_and_cache", shape, "bfloat16", [1, 60, 64], "cuda")
    assert [k.tokens_bucket for k in ks] == [1, 64]
    assert all(k.heads_q == 32 and k.heads_k == 8 and k.head_dim == 128 and k.rotate_k for k in ks)


def test_cuda_kernels_bind_and_refuse_without_a_device():
    """posattn._cuda's cache kernels (never a default: not verified on a GPU) parse their
    arguments and raise the documented RuntimeError when no device is visible; the "cuda"
    backend is chosen only by name."""
    from posattn import dispatch
    from posattn.decode.cache import CacheKey, _cuda_supports
    from posattn.kernels import cpu_cache
    from posattn.kernels import cuda as ck

    key = CacheKey("cuda", "bfloat16", 128, 128, 32, 8, 1, 1, False, True, 64)
    assert not _cuda_supports(key, explicit=False)[0] and "backend='cuda'" in _cuda_supports(key, False)[1]
    if not ck.built():
        pytest.skip("posattn._cuda is not built here")
    m = ck.module()
    if not hasattr(m, "rope_cache_forward"):
        pytest.skip("posattn._cuda was built before the cache kernels")
    if m.device_count() > 0:
        assert dispatch.kernels("rope_and_cache")["cuda"].supports(key, explicit=True)[0]
        pytest.skip("a CUDA device is visible: the kernels run in the oracle tests")
    spec = posattn.RopeSpec(64)
    q, k, v = torch.zeros(1, 3, 2, 64), torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64)
    kc = torch.zeros(2, 4, 1, 64)
    args = cpu_cache.cache_args(q, q, k, v, kc, kc, torch.arange(3), torch.arange(3).view(1, 1, 3),
                                spec.tables("cpu"), 64, False, True)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        m.rope_cache_forward(*args, 0, 128, 0)
    lens, src = torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        m.kv_compact_forward(cpu_cache.compact_args(kc, kc, lens, src, torch.ones(1, dtype=torch.int64), None),
                             128, 0)

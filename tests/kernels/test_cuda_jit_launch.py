"""The prebuilt and the NVRTC providers launch identically: both call the launch functions of
csrc/include/posattn/cuda_launch_kernels.h (the nvcc launchers directly, the JIT through
posattn._cuda_jit_host). Checked on CPU for a table of shapes against the building blocks
the prebuilt module's tests pin (posattn._C: cuda_pick_vec, cuda_split_heads,
cuda_cos_sin_plan), plus the provider choice and the JIT's kernel names."""
import importlib
import re
from pathlib import Path

import pytest
import torch

from posattn.kernels import native

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host():
    try:
        return importlib.import_module("posattn._cuda_jit_host")
    except ImportError:
        pytest.skip("posattn._cuda_jit_host is not built")


@pytest.fixture(scope="module")
def C():
    m = importlib.import_module("posattn._C")
    if not hasattr(m, "cuda_cos_sin_plan"):
        pytest.skip("posattn._C predates the launch-plan bindings")
    return m


def test_nvcc_launchers_use_the_shared_decisions():
    # the prebuilt side of the sharing: every launcher takes its launch from the header
    for src, call in (("rope_cuda.cu", "rope_launch(p, dtype, threads, sm_count())"),
                      ("rope_cos_sin.cu", "cos_sin_launch(p, dtype, threads, sm_count())"),
                      ("cache_cuda.cu", "rope_cache_launch(p, dtype, threads)"),
                      ("cache_cuda.cu", "kv_compact_launch(p, threads)")):
        text = (ROOT / "csrc" / "cuda" / src).read_text()
        assert call in text, (src, call)
    # and no launcher computes a grid, split or vector width of its own
    for src in ("rope_cuda.cu", "rope_cos_sin.cu", "cache_cuda.cu"):
        host_part = (ROOT / "csrc" / "cuda" / src).read_text().split("#if !defined(__CUDACC_RTC__)  // host")[-1]
        assert not re.search(r"split_heads\(|pick_vec_width\(|cos_sin_launch_plan\(", host_part), src


SHAPES = [  # (B, S, Hq, Hk, D, R, interleaved, dtype, threads, sms)
    (1, 7, 3, 1, 80, 80, False, torch.bfloat16, 128, 132),
    (2, 7, 3, 3, 96, 64, True, torch.float16, 256, 132),
    (1, 1, 32, 8, 128, 128, False, torch.bfloat16, 128, 132),    # decode: heads split
    (4, 1, 64, 8, 128, 128, False, torch.float32, 0, 132),
    (2, 300, 8, 8, 64, 64, False, torch.float64, 512, 108),
    (1, 5000, 2, 2, 128, 128, True, torch.bfloat16, 1024, 132),
    (3, 9, 5, 0, 96, 96, False, torch.float32, 64, 16),
]


def _qk(B, S, Hq, Hk, D, dtype):
    q = torch.zeros(B, S, Hq, D, dtype=dtype)
    k = torch.zeros(B, S, Hk, D, dtype=dtype) if Hk else None
    return q, (torch.empty_like(q)), k, (torch.empty_like(k) if k is not None else None)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_launch_matches_prebuilt_rule(host, C, shape):
    B, S, Hq, Hk, D, R, inter, dtype, threads, sms = shape
    q, qo, k, ko = _qk(B, S, Hq, Hk, D, dtype)
    angles = torch.zeros(1, S, 1, R // 2, dtype=torch.float32)
    code = native.DTYPE_CODE[dtype]
    L = host.rope_launch(native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
                         native.dims_args(q, R, inter, False), [], [], 1.0, native.angle_args(angles), 1.0,
                         code, threads, sms)
    # the rule of the prebuilt launcher, from the pieces posattn._C binds
    t = min(threads if threads > 0 else 128, 1024)
    views = [native.rope_tensor_args(x, o) for x, o in ((q, qo), (k, ko)) if x is not None]
    vec = C.cuda_pick_vec(q.element_size(), R // 2, inter, B, S, views)
    assert L["smem_table"] and L["vec"] == vec
    assert L["smem"] == 2 * (R // 2) * (8 if dtype == torch.float64 else 4)
    heads = Hq + Hk
    ppc = (vec // 2 if vec > 1 else 1) if inter else vec
    hpb = heads
    if B * S < sms:
        hpb, t = C.cuda_split_heads(B * S, heads, (R // 2) // ppc, t, sms)
    assert (L["threads"], L["hpb"], L["grid_x"], L["grid_y"]) == (t, hpb, B * S, -(-heads // hpb))
    assert len(L["args"]) == 2 and int.from_bytes(L["args"][1], "little") == hpb


def test_rope_launch_big_table_goes_per_element(host):
    q, qo, k, ko = _qk(1, 3, 64, 0, 128, torch.bfloat16)
    angles = torch.zeros(1, 3, 64, 64, dtype=torch.float32)  # 64 rows x 64 pairs x 2 x 4 B = 32 KiB + ...
    L = host.rope_launch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 128, False, False), [], [], 1.0,
                         native.angle_args(angles), 1.0, native.DTYPE_CODE[torch.bfloat16], 128, 132)
    assert L["smem_table"] is (64 * 64 * 2 * 4 <= 32 * 1024)
    angles = torch.zeros(1, 3, 64, 65, dtype=torch.float32)
    q, qo, _, _ = _qk(1, 3, 64, 0, 130, torch.bfloat16)
    L = host.rope_launch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 130, False, False), [], [], 1.0,
                         native.angle_args(angles), 1.0, native.DTYPE_CODE[torch.bfloat16], 128, 132)
    assert not L["smem_table"] and L["smem"] == 0 and L["vec"] == 1


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cos_sin_launch_matches_prebuilt_plan(host, C, shape):
    from posattn.kernels.rope_cos_sin_native import _common

    B, S, Hq, Hk, D, R, inter, dtype, threads, sms = shape
    q, qo, k, ko = _qk(B, S, Hq, Hk, D, dtype)
    if k is None:
        k, ko = torch.zeros(B, S, 0, D, dtype=dtype), torch.zeros(B, S, 0, D, dtype=dtype)
    tab = torch.zeros(1, S, R // 2, dtype=torch.float32)  # [Bt, rows, R/2]
    pos = torch.arange(S).view(1, S)
    common = _common(q, qo, k, ko, tab, tab, tab, tab, pos, R, inter, 1.0)
    L = host.cos_sin_launch(*common[:-1], threads, sms)
    views = [v for v in (common[0], common[1]) if v]
    vec = C.cuda_pick_vec(q.element_size(), R // 2, inter, B, S, views)
    ppc = (vec // 2 if vec > 1 else 1) if inter else vec
    acc = 8 if dtype == torch.float64 else 4
    pl = C.cuda_cos_sin_plan(B * S, Hq + Hk, R // 2, acc, ppc, threads, sms)
    assert L["vec"] == vec
    for f in ("threads", "tpb", "hpb", "token_blocks", "grid_x", "grid_y", "smem", "smem_attr"):
        assert L[f] == pl[f], f
    assert [int.from_bytes(a, "little", signed=True) for a in L["args"][1:]] == [pl["tpb"], pl["hpb"],
                                                                               pl["token_blocks"]]


def test_kernel_names_are_catalogued(host):
    from posattn.kernels import cuda_jit_launch as jl
    from posattn.kernels.cuda_jit_catalogue import CATALOGUE

    for code in range(4):
        for vec in (1, 2, 4, 8):
            if vec * (8 if code == 3 else 4 if code == 0 else 2) > 16:
                continue
            for table in (True, False):
                if table or vec == 1:
                    assert jl.rope_kernel_name(code, {"vec": vec, "smem_table": table}) in CATALOGUE["rope_cuda.cu"]
            for tcode in range(4):
                assert jl.cos_sin_kernel_name(code, tcode, {"vec": vec}) in CATALOGUE["rope_cos_sin.cu"]
        assert jl.rope_cache_kernel_name(code) in CATALOGUE["cache_cuda.cu"]
    for w in (16, 4, 2):
        assert jl.kv_compact_kernel_name({"vec": w}) in CATALOGUE["cache_cuda.cu"]


def test_struct_args_are_the_problem_bytes(host):
    # the RopeProblem passed by value: its pointers sit where the C++ layout puts them
    q, qo, _, _ = _qk(1, 2, 2, 0, 64, torch.float32)
    angles = torch.zeros(1, 2, 1, 32)
    L = host.rope_launch(native.rope_tensor_args(q, qo), [], native.dims_args(q, 64, False, False), [], [], 1.0,
                         native.angle_args(angles), 1.0, 0, 128, 4)
    blob = L["args"][0]
    assert int.from_bytes(blob[0:8], "little") == q.data_ptr()
    assert int.from_bytes(blob[8:16], "little") == qo.data_ptr()
    assert angles.data_ptr().to_bytes(8, "little") in blob


@pytest.mark.parametrize("arch,want,built,archs,jit,expect", [
    ("sm_90a", "auto", True, ["sm_80", "sm_90a"], True, "prebuilt"),
    ("sm_100a", "auto", True, ["sm_80", "sm_90a"], True, "jit"),
    ("sm_100a", "auto", True, ["sm_80", "sm_90a"], False, "prebuilt"),   # driver JITs the PTX
    ("sm_90a", "auto", False, None, True, "jit"),
    ("sm_90a", "auto", False, None, False, None),
    ("sm_90a", "jit", True, ["sm_90a"], True, "jit"),
    ("sm_100a", "prebuilt", True, ["sm_90a"], True, "prebuilt"),
    ("sm_86", "auto", True, None, True, "prebuilt"),  # a module that predates recording its archs
])
def test_provider_choice(arch, want, built, archs, jit, expect):
    from posattn.kernels import cuda

    name, why = cuda.choose_provider(arch, want, built, archs, jit)
    assert name == expect and why


def test_provider_env_is_checked():
    from posattn.kernels import cuda

    with pytest.raises(ValueError, match="POSATTN_CUDA_PROVIDER"):
        cuda.choose_provider("sm_90a", "fast", True, None, True)


def test_status_without_prebuilt_module_names_the_jit(monkeypatch):
    # a `pip install .` without nvcc: no posattn._cuda; the backend then rests on the JIT
    from posattn.kernels import cuda, cuda_jit

    monkeypatch.setattr(cuda, "_cuda", None)
    monkeypatch.setattr(cuda_jit, "status", lambda: (True, ""))
    monkeypatch.setattr(cuda.torch.cuda, "is_available", lambda: False)
    ok, why = cuda.status()
    assert not ok and "NVRTC provider needs a GPU" in why
    monkeypatch.setattr(cuda.torch.cuda, "is_available", lambda: True)
    assert cuda.status() == (True, "")
    monkeypatch.setattr(cuda_jit, "status", lambda: (False, "CuPy/NVRTC unavailable: no cupy"))
    ok, why = cuda.status()
    assert not ok and "no cupy" in why


def test_info_reports_providers():
    from posattn.kernels import cuda

    info = cuda.providers_info()
    assert set(info) == {"prebuilt", "jit", "serving"}
    assert all(isinstance(v, str) and v for v in info.values())


def test_jit_module_passes_the_decided_launch_to_the_driver(host, monkeypatch):
    # the Python glue of the JIT launch, without a GPU: the driver call gets the kernel chosen
    # by the shared decision, its grid / block / smem, and a parameter array whose entries
    # point at exactly the argument bytes posattn._cuda_jit_host packed
    pytest.importorskip("cupy")
    import ctypes

    from posattn.kernels import cuda_jit_launch as jl

    calls = []

    class Fn:
        ptr = 4242

    class Driver:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

        def funcSetAttribute(self, *a):
            calls.append(("attr", a))

        def launchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            ptrs = (ctypes.c_void_p * 2).from_address(params)
            calls.append(("launch", (f, gx, gy, gz, bx, by, bz, smem, stream, extra),
                          [ctypes.string_at(p, n) for p, n in zip(ptrs, (len(expected["args"][0]), 4))]))

    m = jl.JitModule()
    names = []
    monkeypatch.setattr(m, "_driver", Driver())
    monkeypatch.setattr(m, "_device", lambda: 0)
    monkeypatch.setattr(m, "_sm_count", lambda dev: 132)
    monkeypatch.setattr(m, "_function", lambda src, name, dev: (names.append((src, name)), Fn())[1])
    q, qo, k, ko = _qk(1, 3, 16, 4, 128, torch.bfloat16)
    angles = torch.zeros(1, 3, 1, 64)
    args = (native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko), native.dims_args(q, 128, False, False),
            [], [], 1.0, native.angle_args(angles), 1.0, native.DTYPE_CODE[torch.bfloat16], 128)
    expected = host.rope_launch(*args, 132)
    m.rope_forward(*args, stream=77)
    assert names == [("rope_cuda.cu", jl.rope_kernel_name(2, expected))]
    kind, geom, payload = calls[-1]
    assert kind == "launch"
    assert geom == (4242, expected["grid_x"], expected["grid_y"], 1, expected["threads"], 1, 1, expected["smem"], 77, 0)
    assert payload == [expected["args"][0], expected["args"][1]]
    with pytest.raises(ValueError, match="too many tokens"):
        m.rope_forward(args[0], args[1], [1 << 20, 1 << 12, 128, 128, 0, 0], *args[3:], stream=0)

"""Ahead-of-time compilation of the Triton rotary kernel for sm_90a (the covering set
of specialisations the catalogue launches) and sm_80 (its core), without a GPU:
catches what the interpreter lets through (globals, dtype rules, fp64 constants)."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from posattn.kernels.triton import rope as tr  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines, which turns @triton.jit
# into the interpreter; compiling needs the real JIT, so the compiles run in one
# child process without it.
_SCRIPT = r"""
import base64, json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from posattn.kernels.triton import rope as tr
out = {}
for arch in (90, 80):
    for name, fn, sig, meta, nw in tr.aot_specializations(arch=arch):
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": nw})
            out[f"sm{arch}:{name}"] = {"cubin": base64.b64encode(k.asm["cubin"]).decode(),
                                       "ptx": k.asm["ptx"] if name == "rope_plain_d128_r128_bf16_half_posi64" else ""}
        except Exception as e:  # reported per specialisation by the tests
            out[f"sm{arch}:{name}"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _get(compiled, arch, name):
    import base64

    res = compiled[f"sm{arch}:{name}"]
    assert "error" not in res, res.get("error")
    return base64.b64decode(res["cubin"]), res["ptx"]


SM90 = list(tr.aot_specializations(arch=90))
SM80 = list(tr.aot_specializations(arch=80))


def test_covering_set_spans_the_catalogue():
    names = [s[0] for s in SM90]
    assert len(names) == len(set(names))
    for vname, *_ in tr.VARIANTS:
        for ty in ("fp32", "fp16", "bf16"):
            assert any(n.startswith(f"rope_{vname}_d128_r128_{ty}_half") for n in names), (vname, ty)
        assert any(n.startswith(f"rope_{vname}_") and "_inter" in n for n in names), vname
    for pos_t in ("i32", "i64", "fp32", "fp64"):
        assert any(n.endswith(f"_pos{pos_t}") for n in names)
    for d in (64, 80, 96, 128, 256):
        assert any(f"_d{d}_" in n for n in names)
    assert any(s[3]["COPY_TAIL"] for s in SM90)


@pytest.mark.parametrize("name", [s[0] for s in SM90])
def test_compiles_sm90a(compiled, name):
    cubin, _ = _get(compiled, 90, name)
    assert len(cubin) > 0


@pytest.mark.parametrize("name", [s[0] for s in SM80])
def test_compiles_sm80(compiled, name):
    cubin, _ = _get(compiled, 80, name)
    assert len(cubin) > 0


def test_fp64_reduction_constants_survive_compilation(compiled):
    """The two-part 2*pi must reach the PTX in fp64: an fp32-rounded C2 would cost
    ~3e-6 rad at position 2^31."""
    _, ptx = _get(compiled, 90, "rope_plain_d128_r128_bf16_half_posi64")
    consts = {struct.unpack(">d", bytes.fromhex(h))[0] for h in re.findall(r"0d([0-9A-Fa-f]{16})", ptx)}
    assert any(abs(abs(c) - abs(tr.TWO_PI_C2.value)) < 1e-22 for c in consts), sorted(consts)
    assert any(abs(c) == tr.TWO_PI_C1.value for c in consts)


def test_main_kernel_does_not_spill(compiled):
    """ptxas -v on the main kernel's PTX: no register spills, at most 128 registers.
    (The 32-byte stack frame is sinf/cosf's slow-path argument reduction, never
    taken for our angles in [-pi, pi]; it is not a spill.)"""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        ptxas = shutil.which("ptxas")
    if not ptxas:
        pytest.skip("ptxas not found")
    _, ptx = _get(compiled, 90, "rope_plain_d128_r128_bf16_half_posi64")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert spills and all(a == "0" and b == "0" for a, b in spills), out
    regs = re.search(r"Used (\d+) registers", out)
    assert regs and int(regs.group(1)) <= 128, out

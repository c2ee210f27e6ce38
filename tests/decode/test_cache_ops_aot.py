"""Ahead-of-time compiles of the cache-write kernels (rope_and_cache, kv_compact) for sm_90a
(works without a GPU): they lower through Triton's NVIDIA pipeline (fp64 angle reduction,
barriers, 64-bit offsets) for every rotary variant, odd head dims and each dtype."""
import pytest

from tests._aot import compile_in_child as _compile_in_child

pytest.importorskip("triton")

SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import cache as ck
out = []
for name, fn, sig, const, nw in ck.aot_specializations():
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, bar=("bar.sync" in ptx or "barrier" in ptx),
                    f64=(".f64" in ptx), cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


def test_cache_kernels_compile_for_sm90a():
    kernels = _compile_in_child(SCRIPT)
    assert len(kernels) == 12
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k
        if k["name"].startswith("kv_compact"):
            assert k["bar"], f"{k['name']}: no barrier between the chunk's loads and stores"
        elif "_raw_" not in k["name"]:
            assert k["f64"], f"{k['name']}: the angle reduction must run in fp64"

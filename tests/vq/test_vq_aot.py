"""Ahead-of-time compiles of posattn.vq's Triton kernels for sm_90a (works without a GPU): assign
(a Hopper fp32 dot), the centroid table and the code gather, for odd head dims and each key/code dtype."""
import pytest

from tests._aot import compile_in_child as _compile_in_child

pytest.importorskip("triton")

SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import vq
out = []
for name, fn, sig, const, nw in vq.aot_specializations():
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw})
    out.append(dict(name=name, sm90a=".target sm_90a" in k.asm["ptx"], cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


def test_vq_kernels_compile_for_sm90a():
    kernels = _compile_in_child(SCRIPT)
    assert len(kernels) == 9
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k

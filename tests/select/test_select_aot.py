"""Ahead-of-time compiles of token selection's Triton kernels for sm_90a (works without a GPU):
scores (post-/pre-RoPE, odd head dims, each dtype), the soft-vote passes, top-k and Quest page
scores lower through Triton's NVIDIA pipeline (histograms, scans, 64-bit offsets) to Hopper code."""
import pytest

from tests._aot import compile_in_child as _compile_in_child

pytest.importorskip("triton")

SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import select_aot
out = []
for name, fn, sig, const, nw in select_aot.aot_specializations():
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, cubin=len(k.asm["cubin"]), shared=k.metadata.shared,
                    i64=("mul.wide" in ptx or ".s64" in ptx or ".u64" in ptx)))
print(json.dumps(out))
"""


def test_select_kernels_compile_for_sm90a():
    kernels = _compile_in_child(SCRIPT)
    assert [k["name"] for k in kernels] == [
        "scores_d128_bf16_rope0", "scores_d128_bf16_rope1", "scores_d80_fp32_rope1", "scores_d96_fp16_rope1",
        "scores_d128_bf16_rope1_map",
        "vote_stats", "vote_sum", "topk_block1024", "topk_block4096", "page_scores_d128_bf16", "page_scores_d80_fp32"]
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k
        assert k["i64"], f"{k['name']}: 64-bit addressing expected"
        assert k["shared"] <= 227 * 1024, k

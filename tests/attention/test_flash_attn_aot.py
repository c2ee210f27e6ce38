"""Ahead-of-time compiles of the flash-attention kernels for sm_90a (works without a GPU).

The interpreter runs the kernels' arithmetic; this checks what it lets through: that every
kernel lowers through Triton's NVIDIA pipeline (constexpr globals, dot shapes, layouts) to
Hopper code with tensor-core (wgmma) products and fits in shared memory. A subset keeps CI
short (odd head dims, fp16/fp32, windows and GQA groups run compiled on a GPU in the same
tests; the full list is ``flash_attn.aot_specializations()``). Runs in a subprocess because
the kernels must be decorated without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import flash_attn as fa
cases = [(128, 0, False, torch.bfloat16, True, False, 4),      # the benchmark's case: fwd, dq, dkdv, delta
         (128, 128, False, torch.bfloat16, True, False, 4)]    # in-kernel RoPE: the forward
out = []
for name, fn, sig, const, nw, ns in fa.aot_specializations(cases):
    if not (name.startswith(("attn_fwd", "attn_delta")) or "_r0" in name):
        continue
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, wgmma="wgmma" in ptx, shared=k.metadata.shared,
                    cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90a():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    kernels = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(kernels) == 5
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k
        if not k["name"].startswith("attn_delta"):  # a row sum: no product
            assert k["wgmma"], f"{k['name']}: no Hopper tensor-core (wgmma) product"
        assert k["shared"] <= 227 * 1024, k

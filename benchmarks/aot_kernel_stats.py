"""Static profile of the anchor-attention Triton kernels, compiled ahead of time for sm_90a
on a machine without a GPU: shared memory per block and, in the PTX, the instructions that
move tiles through shared memory (cp.async: pipelined global-to-shared copies; st/ld.shared,
stmatrix/ldmatrix), CTA barriers and wgmma issues. A layout change that adds a round trip through shared memory shows up here
before anyone times it on a GPU (it is no substitute for timing).

    PYTHONPATH=. python benchmarks/aot_kernel_stats.py [fwd|dq|dkdv ...]

Runs the real Triton compiler (TRITON_INTERPRET is dropped for this process).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTS = {
    "cp.async": r"\bcp\.async\.c[ag]",
    "st.shared": r"\bst\.shared",
    "ld.shared": r"\bld\.shared",
    "stmatrix": r"\bstmatrix",
    "ldmatrix": r"\bldmatrix",
    "bar.sync": r"\b(bar|barrier)\.sync",
    "wgmma": r"wgmma\.mma_async",
}


def main(argv=None) -> int:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from posattn.kernels.triton import flash_attn as fa

    kinds = (argv if argv is not None else sys.argv[1:]) or ["fwd", "dq", "dkdv"]
    # the benchmark's case (bf16, head_dim 128, 32/8 heads, causal), without and with fused RoPE
    cases = [(128, 0, False, torch.bfloat16, True, False, 4), (128, 128, False, torch.bfloat16, True, False, 4)]
    print(f"{'kernel':42s} {'smem B':>7s} " + " ".join(f"{k:>9s}" for k in COUNTS))
    for name, fn, sig, const, nw, ns in fa.aot_specializations(cases):
        if not any(f"attn_{k}_" in name for k in kinds):
            continue
        # what the JIT specialises for the benchmark's launch: 16-byte aligned pointers, and
        # strides and T divisible by 16 (without these hints loads are neither vectorised
        # nor pipelined, and the profile would describe a kernel that never runs)
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if t.startswith("*") or (t == "i32" and (n.startswith("s_") or n == "T"))}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
        ptx = k.asm["ptx"]
        print(f"{name:42s} {k.metadata.shared:7d} "
              + " ".join(f"{len(re.findall(p, ptx)):9d}" for p in COUNTS.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

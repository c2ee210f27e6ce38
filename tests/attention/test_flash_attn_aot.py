"""Ahead-of-time compiles of the flash-attention kernels for sm_90a (works without a GPU).

The interpreter runs the kernels' arithmetic; this checks what it lets through: that every
kernel lowers through Triton's NVIDIA pipeline (constexpr globals, dot shapes, layouts) to
Hopper code with tensor-core (wgmma) products and fits in shared memory. A subset keeps CI
short (odd head dims, fp16/fp32, windows and GQA groups run compiled on a GPU in the same
tests; the full list is ``flash_attn.aot_specializations()``). Runs in a subprocess because
the kernels must be decorated without TRITON_INTERPRET.
"""
import pytest

from tests._aot import compile_in_child as _compile_in_child

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import flash_attn as fa
cases = [(128, 0, False, torch.bfloat16, True, False, 4),      # the benchmark's case: fwd, dq, dkdv, delta
         (128, 128, False, torch.bfloat16, True, False, 4)]    # in-kernel RoPE (table reads): the forward
from posattn.kernels.triton import rope_table as rt
out = []
specs = [s for s in fa.aot_specializations(cases) if s[0].startswith(("attn_fwd", "attn_delta")) or "_r0" in s[0]]
specs += [s for s in rt.aot_specializations() if s[0] == "rope_table_i64_h64"]
for name, fn, sig, const, nw, ns in specs:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    ptx = k.asm["ptx"]
    strides = sorted({t for n, t in sig.items() if n.startswith("s_")})
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, wgmma="wgmma" in ptx, shared=k.metadata.shared,
                    cubin=len(k.asm["cubin"]), strides=strides))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90a():
    """With i64 strides (the signature a head-major tensor past 2^31 elements gets), and the
    per-call cos/sin table kernel that the rotary forward reads."""
    kernels = _compile_in_child(SCRIPT)
    assert len(kernels) == 6
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k
        if k["name"].startswith("attn_"):
            assert k["strides"] == ["i64"], k
        if k["name"].startswith(("attn_fwd", "attn_dq", "attn_dkdv")):  # delta and the table: no product
            assert k["wgmma"], f"{k['name']}: no Hopper tensor-core (wgmma) product"
        assert k["shared"] <= 227 * 1024, k


X3_SCRIPT = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import flash_attn as fa
out = []
for name, fn, sig, const, nw, ns in fa.aot_specializations([(128, 128, False, torch.bfloat16, True, False, 4,
                                                             "bf16x3")]):
    if name.startswith("attn_delta"):
        continue
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, wgmma="wgmma" in ptx, shared=k.metadata.shared,
                    bf16_wgmma="wgmma.mma_async.sync.aligned" in ptx and ".bf16.bf16" in ptx))
print(json.dumps(out))
"""


def test_bf16x3_kernels_compile_for_sm90a_with_bf16_tensor_core_products():
    """qk_precision="bf16x3" at the default H200 config (bf16, head_dim 128, GQA 4): forward, dq
    and dk/dv lower to sm_90a with bf16 wgmma products (the split parts are bf16 operands, not an
    fp32 fallback) and fit Hopper's shared memory."""
    kernels = _compile_in_child(X3_SCRIPT)
    assert [k["name"].split("_")[1] for k in kernels] == ["fwd", "dq", "dkdv"]
    for k in kernels:
        assert k["name"].endswith("_bf16x3") and k["sm90a"] and k["wgmma"] and k["bf16_wgmma"], k
        assert k["shared"] <= 227 * 1024, k


MAP_SCRIPT = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import flash_attn as fa
from posattn.position_maps import SELF_EXTEND
out = []
for name, fn, sig, const, nw, ns in fa.aot_specializations([(128, 128, False, torch.bfloat16, True, False, 4, "bf16",
                                                             SELF_EXTEND)]):
    if name.startswith("attn_delta"):
        continue
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, wgmma="wgmma" in ptx, shared=k.metadata.shared,
                    fp64=sig["POSF"]))
print(json.dumps(out))
"""


def test_position_map_kernels_compile_for_sm90a():
    """anchor_attention with a position map (SelfExtend) at the default H200 config (bf16,
    head_dim 128, GQA 4): forward, dq and dk/dv lower to sm_90a with tensor-core products and
    fit Hopper's shared memory with their two rotations per tile (three compiles only)."""
    kernels = _compile_in_child(MAP_SCRIPT)
    assert [k["name"].split("_")[1] for k in kernels] == ["fwd", "dq", "dkdv"]
    for k in kernels:
        assert k["name"].endswith("_map3") and k["sm90a"] and k["wgmma"] and k["fp64"] == "*fp64", k
        assert k["shared"] <= 227 * 1024, k


SMEM_SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import flash_attn as fa
# (arch, opt-in shared memory per block, the widest cases whose default config must fit)
CLASSES = [(90, 232448, [(256, 256, torch.float32), (192, 192, torch.bfloat16)]),
           (80, 166912, [(256, 256, torch.float32), (128, 128, torch.float32)]),
           (89, 101376, [(256, 256, torch.float32), (256, 256, torch.bfloat16), (128, 128, torch.float32)])]
shard, shards = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)
out, job = [], -1
for arch, limit, cases in CLASSES:
    for D, rot, dtype in cases:
        cfg = fa.default_config(D, dtype, interpret=False, smem_per_block=limit, rope=rot > 0)
        for name, fn, sig, const, nw, ns in fa.aot_specializations([(D, rot, False, dtype, True, False, 4)]):
            if name.startswith("attn_delta"):
                continue
            job += 1
            if job % shards != shard:
                continue
            fwd = name.startswith("attn_fwd")
            const = dict(const, BLOCK_M=cfg["BLOCK_M" if fwd else "BWD_BLOCK_M"],
                         BLOCK_N=cfg["BLOCK_N" if fwd else "BWD_BLOCK_N"])
            opts = {"num_warps": cfg["num_warps" if fwd else "bwd_num_warps"],
                    "num_stages": cfg["num_stages" if fwd else "bwd_num_stages"]}
            # the JIT's specialisation for aligned pointers and strides (what pipelining sizes)
            attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                     if t.startswith("*") or (t in ("i32", "i64") and (n.startswith("s_") or n == "T"))}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=opts)
            out.append(dict(name=f"sm{arch}:{name}", shared=k.metadata.shared, limit=limit))
print(json.dumps(out))
"""


def test_default_configs_fit_each_gpu_class():
    """default_config's blocks and stages fit the shared memory of an H100/H200, an A100 and
    an sm_86/sm_89 GPU for the widest tiles (fp32 or head_dim 256, with in-kernel RoPE)."""
    kernels = _compile_in_child(SMEM_SCRIPT, shards=2)
    assert len(kernels) == 21
    over = [k for k in kernels if k["shared"] > k["limit"]]
    assert not over, over

"""Ahead-of-time compiles of the decode kernels for sm_90a (works without a GPU).

The interpreter runs the kernels' arithmetic; this checks that they lower through Triton's
NVIDIA pipeline (constexpr globals, dot shapes, 64-bit offsets) to Hopper code that fits in
shared memory, for the benchmark's decode and tree-verify cases, odd head dims, fp32, and the
split merge. Runs in a subprocess: the kernels must be decorated without TRITON_INTERPRET.
"""
import pytest

from tests._aot import compile_in_child as _compile_in_child

pytest.importorskip("triton")


SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.kernels.triton import decode as dk
cases = [(128, torch.bfloat16, 4, 1, 64, False, 1),     # decode, 32/8 heads
         (128, torch.bfloat16, 4, 1, 64, False, 8),     # decode, split-KV + merge
         (128, torch.bfloat16, 4, 16, 64, True, 1),     # tree verify, 64 rows
         (80, torch.float32, 2, 1, 64, False, 1),       # odd head dim, exact fp32 products
         (96, torch.float16, 3, 4, 64, True, 2),
         (256, torch.bfloat16, 1, 1, 32, False, 4),
         (192, torch.float16, 8, 8, 32, True, 1),
         (128, torch.bfloat16, 4, 1, 64, False, 4, "kv"),   # sparse decode: one key list per KV head
         (128, torch.bfloat16, 4, 1, 64, False, 1, "q"),    # ... per query head
         (128, torch.bfloat16, 4, 1, 64, False, 1, "", "bf16"),        # pre-RoPE cache, keys rotated per tile
         (128, torch.bfloat16, 4, 1, 64, False, 1, "", "bf16x3"),      # ... split-bf16 products (issue 15)
         (128, torch.bfloat16, 4, 1, 64, False, 1, "kv", "bf16+map1"),  # ReRoPE over selected keys
         (96, torch.float16, 4, 4, 32, True, 1, "", "bf16x3+map4")]     # VistaRoPE, tree, odd head dim
out = []
for name, fn, sig, const, nw, ns in dk.aot_specializations(cases):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns})
    ptx = k.asm["ptx"]
    out.append(dict(name=name, sm90a=".target sm_90a" in ptx, mma=("mma" in ptx), shared=k.metadata.shared,
                    cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


def test_decode_kernels_compile_for_sm90a():
    kernels = _compile_in_child(SCRIPT)
    assert len(kernels) == 13 + 4         # four cases split: their merge kernels too
    for k in kernels:
        assert k["sm90a"] and k["cubin"] > 0, k
        if k["name"].startswith("decode_fwd") and "_fp32_" not in k["name"]:
            assert k["mma"], f"{k['name']}: no tensor-core product"
        assert k["shared"] <= 227 * 1024, k


SMEM_SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.decode.attention import DecodeKey
from posattn.kernels.triton import decode as dk
# (arch, opt-in shared memory per block, the widest keys whose default config must fit)
dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}
keys = [DecodeKey("cuda", "float32", 256, 8, 8, 16, True, False, True, False, 1, 8192, 8),
        DecodeKey("cuda", "float32", 128, 32, 8, 16, True, True, True, False, 64, 8192, 8),
        DecodeKey("cuda", "bfloat16", 256, 32, 8, 16, True, True, True, False, 64, 8192, 8),
        DecodeKey("cuda", "bfloat16", 128, 32, 8, 16, True, False, True, False, 1, 131072, 1)]
shard, shards = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)
out, job = [], -1
for arch, limit in ((90, 232448), (80, 166912), (89, 101376)):
    for key in keys:
        job += 1
        if job % shards != shard:
            continue
        cfg = dk.default_config(key, smem_per_block=limit)
        G = key.heads_q // key.heads_k
        case = (key.head_dim, dt[key.dtype], G, cfg["BLOCK_Q"], cfg["BLOCK_N"], key.tree, 1)
        [(name, fn, sig, const, _, _)] = dk.aot_specializations([case])
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        out.append(dict(name=f"sm{arch}:{name}", shared=k.metadata.shared, limit=limit))
print(json.dumps(out))
"""


def test_default_configs_fit_each_gpu_class():
    """The default launch configs of the widest keys (fp32 or head_dim 256, tree blocks) fit the
    shared memory of an H100/H200, an A100 and an sm_86/sm_89 GPU."""
    kernels = _compile_in_child(SMEM_SCRIPT, shards=2)
    assert len(kernels) == 12
    over = [k for k in kernels if k["shared"] > k["limit"]]
    assert not over, over


ROT_SMEM_SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from posattn.decode.attention import DecodeKey
from posattn.kernels.triton import decode as dk
dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the widest rotation variants: fp32 / head_dim 256, a map (two key rotations) with the split product
keys = [(DecodeKey("cuda", "bfloat16", 256, 32, 8, 16, True, True, True, False, 64, 8192, 8, "", 1, "map",
                   "bf16x3"), "bf16x3+map3"),
        (DecodeKey("cuda", "float32", 256, 8, 8, 16, True, False, True, False, 1, 8192, 8, "", 1, "k", "bf16"),
         "bf16"),
        (DecodeKey("cuda", "bfloat16", 128, 32, 8, 16, True, False, True, False, 1, 131072, 1, "kv", 2048, "map",
                   "bf16"), "bf16+map1"),
        (DecodeKey("cuda", "float32", 256, 8, 8, 16, True, False, True, False, 1, 8192, 8, "", 1, "map", "bf16"),
         "bf16+map4")]
shard, shards = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)
out, job = [], -1
for arch, limit in ((90, 232448), (80, 166912), (89, 101376)):
    for key, rot in keys:
        job += 1
        if job % shards != shard:
            continue
        cfg = dk.default_config(key, smem_per_block=limit)
        G = key.heads_q // key.heads_k
        case = (key.head_dim, dt[key.dtype], G, cfg["BLOCK_Q"], cfg["BLOCK_N"], key.tree, 1, key.kv_lists, rot)
        [(name, fn, sig, const, _, _)] = dk.aot_specializations([case])
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        out.append(dict(name=f"sm{arch}:{name}", shared=k.metadata.shared, limit=limit))
print(json.dumps(out))
"""


def test_rotary_default_configs_fit_each_gpu_class():
    """The in-kernel rotation's widest variants (pre-RoPE fp32 head_dim 256, SelfExtend with bf16x3
    over tree blocks, ReRoPE over key lists) fit each GPU class with the default launch config."""
    kernels = _compile_in_child(ROT_SMEM_SCRIPT, shards=2)
    assert len(kernels) == 12
    over = [k for k in kernels if k["shared"] > k["limit"]]
    assert not over, over

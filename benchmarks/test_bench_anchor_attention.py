"""pytest-benchmark suite for anchor attention on the CPU (tiny): the fp64 reference, the
C++ kernel (forward + backward) and the block-list lowering. The speed targets against
FlexAttention (training step >= 1.3x, forward >= 1.1x) are GPU-only:
benchmarks/bench_anchor_attention.py measures them on a CUDA device.

    pytest benchmarks/test_bench_anchor_attention.py --benchmark-only
"""
import pytest
import torch

from benchmarks.bench_anchor_attention import make_layout
from posattn.attention.masks import MaskSpec, lower
from posattn.kernels.reference import attention as ref


@pytest.mark.parametrize("tokens", [128, 512])
def test_reference_forward(benchmark, tokens):
    cu, rows = make_layout(tokens // 2, 2, 4)
    q = torch.randn(tokens, 4, 64)
    k = torch.randn(tokens, 2, 64)
    v = torch.randn(tokens, 2, 64)
    out, _ = benchmark(ref.anchor_attention, q, k, v, cu, rows, 1, True, None)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("tokens,docs", [(16384, 4), (65536, 32)])
def test_mask_lowering(benchmark, tokens, docs):
    """The block lists of a 16k/64k-token row (128 x 64 blocks), built from the boundaries."""
    cu, rows = make_layout(tokens, 1, docs)
    spec = MaskSpec(causal=True, num_anchors=1)
    lists = benchmark(lower, spec, cu, rows, tokens, 128, 64)
    nqb, nkb = -(-tokens // 128), -(-tokens // 64)
    assert 0 < lists.nnz < nqb * nkb


@pytest.mark.parametrize("tokens", [512, 2048])
def test_cpu_kernel_step(benchmark, tokens):
    """Forward + backward on the C++ backend (posattn._C), bf16 inputs, 4/2 heads of 64."""
    import posattn
    from posattn import dispatch

    if not dispatch.backend_status("cpu")[0]:
        pytest.skip(dispatch.backend_status("cpu")[1])
    cu, rows = make_layout(tokens // 2, 2, 4)
    q = torch.randn(tokens, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, 2, 64, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = posattn.anchor_attention(q, k, v, cu, cu_rows=rows, backend="cpu")
        return torch.autograd.grad(out.float().square().sum(), (q, k, v))

    grads = benchmark(step)
    assert all(torch.isfinite(g.float()).all() for g in grads)


def test_aot_kernel_stats_runs():
    """benchmarks/aot_kernel_stats.py (the static sm_90a profile) keeps working: it compiles
    the dkdv kernels with the real Triton compiler in a child process (no interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "aot_kernel_stats.py"), "dkdv"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["attn_dkdv_d128_r0h_bf16_causal_g4", "attn_dkdv_d128_r128h_bf16_causal_g4"]
    assert all(int(row[1]) <= 232448 and int(row[-1]) > 0 for row in rows)  # fits an H100/H200 SM; issues wgmma


def test_qk_precision_ratio_runs_on_cpu():
    """The bf16x3-vs-bf16 timing (a GPU target, <= 1.6x) runs end to end on a tiny CPU case."""
    from benchmarks.bench_anchor_attention import bench_qk_precision

    r = bench_qk_precision(32, 2, 3, hq=4, hk=2, d=32, device="cpu", backend="cpu")
    assert set(r["fwd_ms"]) == set(r["step_ms"]) == {"bf16", "bf16x3"}
    assert r["ratio_fwd"] > 0 and r["ratio_step"] > 0 and r["targets_met"] == "not a GPU: no target"

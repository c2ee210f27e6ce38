"""The cos/sin-table rotary paths against the on-the-fly kernel and the libraries they replace.

    python benchmarks/bench_cos_sin.py                      # sweep, table on stdout
    python benchmarks/bench_cos_sin.py --json out.jsonl     # ...and one JSON line per row
    pytest benchmarks/bench_cos_sin.py --benchmark-only     # the same cases under pytest-benchmark

Rows (each checked against the fp64 reference before it is timed; a fast wrong kernel is not a result):
    posattn-cos_sin      apply_rope_cos_sin, per-token [T, R/2] tables
    posattn-cache        apply_rope_cos_sin, cos_sin_cache [max_pos, R] + positions (vLLM/FlashInfer form)
    posattn-on-the-fly   apply_rope (angles computed in the kernel)
    flashinfer-cache     flashinfer.apply_rope_with_cos_sin_cache (GPU, when importable)
    vllm-inplace         vllm._custom_ops.rotary_embedding, in place (GPU, when importable)
Shapes: Llama-3-8B-like heads (32 q, 8 kv, head_dim 128), bf16 on a GPU, fp32 on a CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import posattn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HK, D = 32, 8, 128
MAX_POS = 1 << 17
GPU_TOKENS = [1, 16, 256, 4096, 16384, 65536]
CPU_TOKENS = [1, 256, 4096]


def _time(fn, reps=30, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(T, dtype):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(T, HQ, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(T, HK, D, generator=g).to(dtype).to(DEVICE)
    pos = torch.randint(0, MAX_POS, (T,), generator=g).to(DEVICE)
    spec = posattn.RopeSpec(D, base=500000.0)
    inv = spec.inv_freq().double()
    ang = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).float().to(DEVICE)
    cos = cache[pos, : D // 2].contiguous()
    sin = cache[pos, D // 2:].contiguous()
    return dict(q=q, k=k, pos=pos, spec=spec, cache=cache, cos=cos, sin=sin)


def impls():
    """name -> (callable(inputs) -> fn, in_place)"""
    out = {
        "posattn-cos_sin": lambda x: (lambda: posattn.apply_rope_cos_sin(x["q"], x["k"], x["cos"], x["sin"],
                                                                         layout="thd")),
        "posattn-cache": lambda x: (lambda: posattn.apply_rope_cos_sin(
            x["q"], x["k"], cos_sin_cache=x["cache"], positions=x["pos"], layout="thd", check_bounds=False)),
        "posattn-on-the-fly": lambda x: (lambda: posattn.apply_rope(x["q"], x["k"], x["pos"], x["spec"], layout="thd")),
    }
    if DEVICE == "cuda":
        try:
            import flashinfer

            out["flashinfer-cache"] = lambda x: (lambda: flashinfer.apply_rope_with_cos_sin_cache(
                x["pos"], x["q"].view(x["q"].shape[0], -1), x["k"].view(x["k"].shape[0], -1), D, x["cache"], True))
        except Exception:
            pass
        try:
            from vllm import _custom_ops as vops

            out["vllm-inplace"] = lambda x: (lambda: vops.rotary_embedding(
                x["pos"], x["q"].view(x["q"].shape[0], -1), x["k"].view(x["k"].shape[0], -1), D,
                x["cache"].to(x["q"].dtype), True))
        except Exception:
            pass
    return out


def check(name, x):
    """The row's answer against the fp64 reference (small inputs)."""
    ref_q, _ = posattn.apply_rope_cos_sin(x["q"], x["k"], cos_sin_cache=x["cache"], positions=x["pos"],
                                          layout="thd", backend="reference")
    q0 = x["q"].clone()
    res = impls()[name](dict(x, q=q0, k=x["k"].clone()))()
    got = q0 if res is None else res[0]
    err = float((got.view(ref_q.shape).double() - ref_q.double()).abs().max())
    limit = 2e-2 if x["q"].dtype != torch.float32 else 1e-4
    if not err <= limit:
        raise AssertionError(f"{name}: max error {err:.3g} against the fp64 reference")


def sweep(tokens=None, dtype=None):
    dtype = dtype or (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    tokens = tokens or (GPU_TOKENS if DEVICE == "cuda" else CPU_TOKENS)
    rows = []
    small = make_inputs(7, dtype)
    for name in impls():
        check(name, small)
    for T in tokens:
        x = make_inputs(T, dtype)
        for name, factory in impls().items():
            t = _time(factory(x))
            nbytes = 2 * (x["q"].numel() + x["k"].numel()) * x["q"].element_size()
            rows.append({"op": "rope_cos_sin", "impl": name, "tokens": T, "dtype": str(dtype).removeprefix("torch."),
                         "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                         "median_s": t, "GB/s": nbytes / t / 1e9})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*")
    ap.add_argument("--json", help="append one JSON line per row to this file")
    args = ap.parse_args(argv)
    rows = sweep(args.tokens)
    print(f"{'impl':<20} {'tokens':>7} {'dtype':>9} {'median us':>11} {'GB/s':>8}")
    for r in rows:
        print(f"{r['impl']:<20} {r['tokens']:>7} {r['dtype']:>9} {r['median_s'] * 1e6:>11.1f} {r['GB/s']:>8.2f}")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- pytest-benchmark -------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", list(impls()))
    @pytest.mark.parametrize("tokens", GPU_TOKENS[2:5] if DEVICE == "cuda" else [256])
    def test_cos_sin(benchmark, impl, tokens):
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        check(impl, make_inputs(7, dtype))
        fn = impls()[impl](make_inputs(tokens, dtype))

        def run():
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark(run)


if __name__ == "__main__":
    main()

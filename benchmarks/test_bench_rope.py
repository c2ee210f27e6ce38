"""apply_rope under pytest-benchmark: posattn's backends and transformers' rotary.

    make bench                                          # run and save (.benchmarks/)
    make bench BENCH_ARGS=--benchmark-compare           # ...and compare with the last saved run
    make bench BENCH_ARGS="--benchmark-compare --benchmark-compare-fail=median:10%"   # fail on a regression

Inputs, peers and byte counts come from posattn.bench.ops.rope, the same
cases `posattn bench` times. Each case first checks its answer against the
fp64 reference: a fast wrong kernel is not a result.
"""
import pytest
import torch

from posattn.bench.registry import ops
from tests._tol import tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVTYPE = torch.device(DEVICE).type
ROPE = ops()["rope"]

if DEVTYPE == "cuda":
    SIZES, IMPLS = [128, 4096, 32768], ["cuda", "triton", "transformers", "liger", "flashinfer", "flash-attn"]
    DTYPES = [torch.bfloat16, torch.float16]
else:
    SIZES, IMPLS = [128, 2048], ["cpu", "reference", "transformers"]
    DTYPES = [torch.float32, torch.bfloat16]


def _sync(fn):
    if DEVTYPE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tokens", SIZES)
def test_rope(benchmark, impl, dtype, tokens):
    spec = ROPE.impls[impl]
    ok, why = spec.available(DEVTYPE)
    if not ok:
        pytest.skip(f"{impl}: {why}")
    shape = ROPE.parse_shape(f"B=1,S={tokens}")
    if impl == "reference" and tokens > 256:
        pytest.skip("the fp64 reference is timed on small inputs only")
    inputs = ROPE.make_inputs(shape, dtype, DEVICE)
    ref = ROPE.reference(inputs)
    prepared = spec.factory({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
                            DEVTYPE)
    fn, canon = prepared if isinstance(prepared, tuple) else (prepared, None)
    out = fn()
    out = canon(out) if canon else out
    err = max(float((o.double() - r).abs().max()) for o, r in zip(out, ref))
    if spec.kind == "posattn":
        t = tol(dtype)
        assert err <= t["atol"] + t["rtol"] * 8, f"{impl} is wrong: max abs err {err}"
    benchmark.group = f"rope {str(dtype).removeprefix('torch.')} tokens={tokens}"
    benchmark.extra_info.update(bytes=ROPE.bytes(shape, dtype), max_abs_err=err, kind=spec.kind,
                                shape=shape.key, device=DEVICE)
    benchmark(_sync(fn))

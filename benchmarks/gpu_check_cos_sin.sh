#!/usr/bin/env bash
# GPU check for the cos/sin-table rotary and the compat doors (issue 7), one short script:
#   1. build posattn._cuda (nvcc), 2. the numerics tests with device=cuda (cuda, triton and
#   reference backends; the same tests CPU CI runs), 3. the benchmark sweep: posattn's cos/sin,
#   cos_sin_cache and on-the-fly paths, plus FlashInfer's apply_rope_with_cos_sin_cache and vLLM's
#   in-place rotary_embedding when importable. Results: $OUT (or .) /cos_sin_gpu.jsonl
# About 3-5 minutes on an H100/H200 once the Triton kernels are compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUTDIR=${OUT:-.}
POSATTN_CUDA=1 "$PY" setup.py -q build_ext --inplace
PYTHONUNBUFFERED=1 "$PY" -m pytest -q -x tests/rope/test_cos_sin.py tests/compat -k "not aot" 2>&1 | tee "$OUTDIR/cos_sin_gpu_tests.log"
PYTHONUNBUFFERED=1 "$PY" benchmarks/bench_cos_sin.py --json "$OUTDIR/cos_sin_gpu.jsonl" 2>&1 | tee "$OUTDIR/cos_sin_gpu_bench.log"

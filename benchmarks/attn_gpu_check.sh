#!/usr/bin/env bash
# GPU check of anchor attention (issue 6): the attention tests with device=cuda (Triton
# kernels compiled for the GPU, against the fp64 reference), then the benchmark against
# FlexAttention on the layouts. About 4-5 minutes on an H200 (Triton and Flex compiles
# included). Output files go to ${OUT:-attn-gpu-out}.
set -u
OUT=${OUT:-attn-gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "== $(git log -1 --oneline 2>/dev/null)"; ls posattn/attention >/dev/null || exit 3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== tests (device=cuda)"
timeout ${TEST_TIMEOUT:-180} $PY -m pytest -q -x ${TESTS:-tests/attention} -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -25
echo "== benchmark vs FlexAttention"
timeout ${BENCH_TIMEOUT:-240} $PY benchmarks/bench_anchor_attention.py ${BENCH_ARGS:-} --out "$OUT/bench_anchor_attention.jsonl" 2>&1 | tail -20

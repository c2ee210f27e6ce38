#!/usr/bin/env bash
# GPU check of the autotuner (issue 4): build, tune rope on the GPU (cuda + triton
# backends, CUDA-event timer), run the autotune tests with device=cuda, export the
# tuned entries in the shipped format, and time the host overhead on this host.
# Output files go to ${OUT:-tune-gpu-out}.
set -u
OUT=${OUT:-tune-gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 POSATTN_TUNE_DIR=$PWD/.tune-gpu
echo "== $(git branch --show-current 2>/dev/null) $(git log -1 --oneline 2>/dev/null)"; ls posattn/autotune >/dev/null || exit 3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== build"; (time POSATTN_CUDA=1 timeout 300 $PY setup.py -q build_ext --inplace) 2>&1 | tail -4
$PY -m posattn info --json | head -30
echo "== tune"; timeout 200 $PY -m posattn tune --ops rope --preset llama3-8b --dtype bf16 --tokens 1,256,4096,65536 2>&1 | tee "$OUT/tune.txt"
$PY -m posattn cache show --all > "$OUT/cache_show.txt" 2>&1
$PY -m posattn cache export -o "$OUT/export"; cp "$OUT"/export/*.json "$OUT/" 2>/dev/null
echo "== tests (device=cuda)"; timeout 150 $PY -m pytest -q -x tests/autotune -p no:cacheprovider 2>&1 | tail -15
echo "== host overhead"; timeout 60 $PY benchmarks/bench_overhead.py 2>&1 | tee "$OUT/overhead.txt"

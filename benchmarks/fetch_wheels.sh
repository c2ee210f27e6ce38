#!/usr/bin/env bash
# Prepare ./.whl for benchmarks/gpu_check.sh on an offline GPU machine (CPython 3.12, x86-64):
# the peers and dependencies its image lacks, as wheels, without their own dependencies
# (torch, triton and transformers are expected there already). gpu_check.sh installs
# whatever it finds in ./.whl into /tmp/site before it starts.
#
#   bash benchmarks/fetch_wheels.sh            # on a machine with PyPI access
#
# FlashInfer and flash-attn are not fetched: FlashInfer compiles its kernels at first use
# and its dependencies exceed what travels to the GPU machine; flash-attn ships no wheel
# on PyPI. Both are benchmarked whenever they are importable there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  liger-kernel==0.8.5        # peer: liger_rotary_pos_emb (Triton; pure Python wheel)
  platformdirs==4.14.5       # posattn dependency missing from the GPU image
)
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
ls -la .whl

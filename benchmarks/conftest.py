"""pytest-benchmark suites (`make bench`): CPU by default, the GPU when one is visible.

The cases come from the same registry as `posattn bench` (posattn/bench/ops/),
so both time the same inputs. Saved runs (--benchmark-autosave, under
.benchmarks/) let a later run show regressions with --benchmark-compare.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's posattn, and tests._tol
    sys.path.insert(0, str(ROOT))

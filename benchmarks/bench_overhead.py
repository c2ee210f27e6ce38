"""Host overhead of dispatch and of the tuned-config cache, on the CPU.

    PYTHONPATH=. python benchmarks/bench_overhead.py

Measures, with the dispatch decision memoised (the steady state):
  direct      the chosen backend's kernel function, called with prepared arguments
  op          posattn.apply_rope on the same tiny inputs (validation, key, select, launch)
  select      dispatch.select on a memoised key
  lookup      the autotune config lookup for a key it has answered before (its memo)
  index       the cache index's exact-key lookup without that memo (what a first sight costs)
Targets (issue 4): op - direct <= 3 us; lookup <= 1 us.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call_us(fn, n=20000, repeat=7) -> float:
    """Median over ``repeat`` runs of the mean microseconds per call over ``n`` calls."""
    for _ in range(n // 10):
        fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def setup():
    """Tiny inputs, a cache file holding their key, and the callables to time."""
    tmp = tempfile.mkdtemp(prefix="posattn-bench-")
    os.environ["POSATTN_TUNE_DIR"] = tmp
    os.environ.setdefault("POSATTN_AUTOTUNE", "cached")
    import torch

    import posattn
    from posattn import autotune, dispatch
    from posattn.autotune import cache as C
    from posattn.autotune import fingerprint as F
    from posattn.rope.ops import RopeKey

    torch.set_num_threads(1)
    q = torch.randn(1, 1, 1, 16)
    pos = torch.arange(1)
    spec = posattn.RopeSpec(16)
    key = RopeKey("cpu", "float32", 16, 16, False, 1, 0, "int64", 1)
    cfg = {"threads": 1, "chunk": 16}
    fields = C.key_fields(key)
    C.write_entries(Path(tmp) / f"{F.cpu_device().fingerprint}.json",
                    {"fingerprint": F.cpu_device().fingerprint, "device": {}, "versions": {}},
                    [{"op": "rope", "backend": "cpu", "version": 1, "key": fields, "bucket_fields": ["tokens_bucket"],
                      "default": {"threads": 0, "chunk": 16},
                      "results": [{"config": cfg, "status": "ok", "time_s": 1e-6, "error": ""}]}])
    lk = autotune.reload()
    kernel, chosen = dispatch.select("rope", key)
    assert kernel.backend == "cpu" and chosen == cfg, (kernel.backend, chosen)
    qo = torch.empty_like(q)
    pos2 = pos.unsqueeze(0)
    inv = spec.inv_freq_on(q.device)
    fn = kernel.fn
    idx = lk.index("cpu")[1]
    return {
        "direct": lambda: fn(q, qo, None, None, pos2, inv, 16, False, chosen),
        "op": lambda: posattn.apply_rope(q, None, pos, spec),
        "select": lambda: dispatch.select("rope", key),
        "lookup": lambda: lk.config("rope", kernel, key),
        "index": lambda: idx.config("rope", "cpu", 1, key),
    }


def main() -> int:
    fns = setup()
    res = {name: per_call_us(f) for name, f in fns.items()}
    for name, us in res.items():
        print(f"{name:8s} {us:8.3f} us/call")
    over = res["op"] - res["direct"]
    print(f"op - direct = {over:.3f} us (target <= 3 us); lookup = {res['lookup']:.3f} us (target <= 1 us); "
          f"index (unmemoised) = {res['index']:.3f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

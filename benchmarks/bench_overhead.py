"""Host overhead of dispatch and of the tuned-config cache, on the CPU.

    PYTHONPATH=. python benchmarks/bench_overhead.py

Measures, with the dispatch decision memoised (the steady state), on q [1, 1, 1, 16]
fp32, k None, positions int64 [1], one thread:
  kernel      the chosen backend's kernel function (posattn.kernels.cpu.rope_forward) with
              every argument prepared: output tensor, [A, Bp, S] positions view, lowered
              tables, launch config. Its own cost (~8 us here) is mostly the Python
              marshalling of tensors into pointers and strides before the C++ call.
  direct      what a caller of that kernel function needs per call to get a fresh result:
              torch.empty_like(q) for the output, then the same call as ``kernel``.
  prepared    the cheapest way to call the backend directly: empty_like(q), then the launcher
              that Kernel.prepare (posattn.kernels.cpu.rope_prepare) built once for this
              signature, which reads only pointers per call. The op's plans call this same
              launcher, so ``op - prepared`` is what the op itself adds: the plan lookup
              (signature key, dict lookup) and the plan's own bookkeeping.
  op          posattn.apply_rope(q, None, positions, spec): checks (or its plan for a
              signature seen before), backend choice, positions view, output, kernel call
  cs_*        the same rows for posattn.apply_rope_cos_sin(q, None, cos, sin) with per-token
              half-width tables [1, 8] (the kernel function with its four prepared [1, S, R/2]
              table views; posattn.kernels.rope_cos_sin_native.cpu_prepare)
  ang_*       the same rows for posattn.apply_rope_angles(q, None, angles) with angles [1, 1, 8]
              (posattn.kernels.cpu.rope_angles_forward / rope_angles_prepare on its [1, 1, 1, 8] view)
  shift_*     the same rows for posattn.rope_shift(k, 3, spec) on the same tensor as q (a scalar delta;
              direct: the rope kernel function with every token at position 3 as an expanded fp64
              tensor and unit-scaling tables; prepared: the launcher's constant-position call)
  select      dispatch.select on a memoised key
  lookup      the autotune config lookup for a key it has answered before (its memo)
  index       the cache index's exact-key lookup without that memo (what a first sight costs)
Targets (issue 4): a call through the public op costs at most 3 us more than calling the
chosen backend function directly (``op - direct``); lookup <= 1 us. ``op - prepared`` is
printed too: the op against the cheapest direct call there is.

The machine may be shared: op, direct and kernel are timed in interleaved rounds (so that
all three see the same load) and the differences are medians over rounds of the per-round
differences. The 1-minute load average is printed with the figures.
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


def paired_us(fns: dict, n=2000, rounds=41) -> tuple[dict, dict]:
    """Time the callables in ``fns`` in interleaved rounds of ``n`` calls each.

    Returns (median us/call per name, diff) where ``diff(a, b)`` is the median over rounds
    of the per-round difference a - b (both timed in the same round)."""
    names = list(fns)
    for f in fns.values():
        for _ in range(n):
            f()
    per = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            f = fns[name]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            per[name].append((time.perf_counter() - t0) / n * 1e6)
    med = {name: statistics.median(v) for name, v in per.items()}

    def diff(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(per[a], per[b]))

    return med, diff


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
    pos3 = pos[None, None]  # [axes, batch, S]
    tables = spec.tables(q.device)
    fn = kernel.fn
    idx = lk.index("cpu")[1]
    from posattn.rope import cos_sin as CS

    ang = torch.rand(1, 8)
    cos, sin = ang.cos(), ang.sin()
    cs_views = CS._table_views(cos, sin, 16, CS.FORM_HALF, False, False)
    cs_key = CS.CosSinKey("cpu", "float32", "float32", 16, 16, False, False, "", 1, 0, 1)
    cs_kernel, cs_cfg = dispatch.select("rope_cos_sin", cs_key)
    assert cs_kernel.backend == "cpu", cs_kernel.backend
    cs_fn = cs_kernel.fn
    prep = kernel.prepare(q, qo, None, None, pos3, tables, 16, False, 1.0, chosen)
    angles = torch.rand(1, 1, 8)
    ang4 = angles[None]
    ang_kernel, ang_cfg = dispatch.select("rope_angles", RopeKey("cpu", "float32", 16, 16, False, 1, 0, "angles", 1))
    assert ang_kernel.backend == "cpu", ang_kernel.backend
    ang_fn = ang_kernel.fn
    ang_prep = ang_kernel.prepare(q, qo, None, None, ang4, 16, False, 1.0, ang_cfg)
    from posattn.lowered import RopeTables

    unit = RopeTables(tables.inv_freq, 1.0, tables.pair_axis, 1)
    d3 = torch.full((1, 1, 1), 3.0, dtype=torch.float64).expand(1, 1, 1)
    sh_kernel, sh_cfg = dispatch.select("rope", RopeKey("cpu", "float32", 16, 16, False, 1, 0, "float64", 1))
    assert sh_kernel.backend == "cpu", sh_kernel.backend
    sh_prep = sh_kernel.prepare(q, qo, None, None, d3, unit, 16, False, 1.0, sh_cfg)
    cs_prep = cs_kernel.prepare(q, qo, None, None, *cs_views, None, 16, False, 1.0, cs_cfg)
    return {
        "prepared": lambda: prep(q, torch.empty_like(q), None, None, pos3),
        "cs_prepared": lambda: cs_prep(q, torch.empty_like(q), None, None, cs_views, None),
        "ang_prepared": lambda: ang_prep(q, torch.empty_like(q), None, None, ang4),
        "ang_direct": lambda: ang_fn(q, torch.empty_like(q), None, None, ang4, 16, False, 1.0, ang_cfg),
        "ang_op": lambda: posattn.apply_rope_angles(q, None, angles),
        "shift_prepared": lambda: sh_prep(q, torch.empty_like(q), None, None, 3.0),
        "shift_direct": lambda: fn(q, torch.empty_like(q), None, None, d3, unit, 16, False, 1.0, sh_cfg),
        "shift_op": lambda: posattn.rope_shift(q, 3, spec),
        "cs_direct": lambda: cs_fn(q, torch.empty_like(q), None, None, *cs_views, None, 16, False, 1.0, cs_cfg),
        "cs_op": lambda: posattn.apply_rope_cos_sin(q, None, cos, sin),
        "kernel": lambda: fn(q, qo, None, None, pos3, tables, 16, False, 1.0, chosen),
        "direct": lambda: fn(q, torch.empty_like(q), None, None, pos3, tables, 16, False, 1.0, chosen),
        "op": lambda: posattn.apply_rope(q, None, pos, spec),
        "select": lambda: dispatch.select("rope", key),
        "lookup": lambda: lk.config("rope", kernel, key),
        "index": lambda: idx.config("rope", "cpu", 1, key),
    }


def load_average() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except (AttributeError, OSError):
        return "n/a"


def main() -> int:
    fns = setup()
    load0 = load_average()
    med, diff = paired_us({name: fns[name] for name in ("prepared", "direct", "kernel", "op")})
    cs_med, cs_diff = paired_us({name: fns[name] for name in ("cs_prepared", "cs_direct", "cs_op")})
    ang_med, ang_diff = paired_us({name: fns[name] for name in ("ang_prepared", "ang_direct", "ang_op")})
    sh_med, sh_diff = paired_us({name: fns[name] for name in ("shift_prepared", "shift_direct", "shift_op")})
    res = {name: per_call_us(fns[name]) for name in ("select", "lookup", "index")}
    for name, us in list(med.items()) + list(cs_med.items()) + list(ang_med.items()) + list(sh_med.items()) + list(res.items()):
        print(f"{name:8s} {us:8.3f} us/call")
    print(f"op - direct = {diff('op', 'direct'):.3f} us, cs_op - cs_direct = {cs_diff('cs_op', 'cs_direct'):.3f} us, "
          f"ang_op - ang_direct = {ang_diff('ang_op', 'ang_direct'):.3f} us, "
          f"shift_op - shift_direct = {sh_diff('shift_op', 'shift_direct'):.3f} us (target <= 3 us); "
          f"op - prepared = {diff('op', 'prepared'):.3f} us, cs_op - cs_prepared = "
          f"{cs_diff('cs_op', 'cs_prepared'):.3f} us, ang_op - ang_prepared = {ang_diff('ang_op', 'ang_prepared'):.3f} us, "
          f"shift_op - shift_prepared = {sh_diff('shift_op', 'shift_prepared'):.3f} us; "
          f"op - kernel = {diff('op', 'kernel'):.3f} us; "
          f"lookup = {res['lookup']:.3f} us (target <= 1 us); index (unmemoised) = {res['index']:.3f} us; "
          f"load average {load0} -> {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Timing one callable the same way every time.

``measure(fn, device)``: warm-up, then repeated timed runs, each preceded by
a cache flush (cold L2 by default), and the 20th/50th/80th percentiles.

- CPU: ``time.perf_counter`` around each call (the CPU kernels are synchronous).
- GPU: CUDA events around each call; for tiny kernels (under ``graph_below_s``
  per call, host overhead included) the call is captured once in a CUDA graph
  and each rep replays the graph, so the host's launch overhead does not hide
  the kernel's time.
  A callable that cannot be captured falls back to plain events.
- Cold cache: before every timed run a buffer twice the size of the last-level
  cache (GPU: L2; CPU: L3) is overwritten, outside the timed region.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds per call."""

    p20: float
    p50: float
    p80: float
    reps: int
    timer: str  # "perf_counter" | "cuda_event" | "cuda_graph"
    cold_l2: bool
    samples: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"p20": self.p20, "p50": self.p50, "p80": self.p80, "reps": self.reps,
                "timer": self.timer, "cold_l2": self.cold_l2}


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending list."""
    if not sorted_xs:
        raise ValueError("percentile of an empty list")
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: list[float], timer: str, cold: bool) -> Timing:
    xs = sorted(samples)
    return Timing(percentile(xs, 20), percentile(xs, 50), percentile(xs, 80), len(xs), timer, cold, xs)


# --------------------------------------------------------------------------
# cache flushing

_flush_bufs: dict = {}


def _llc_bytes_cpu() -> int:
    """Size of the largest CPU cache level (bytes), 32 MiB when unknown."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            txt = open(path).read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or (32 << 20)


def flush_buffer(device):
    """A byte buffer twice the last-level cache of ``device`` (cached per device)."""
    import torch

    dev = torch.device(device)
    key = str(dev)
    buf = _flush_bufs.get(key)
    if buf is None:
        if dev.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20)
            n = max(2 * l2, 128 << 20)
        else:
            n = 2 * _llc_bytes_cpu()
        buf = torch.empty(n, dtype=torch.uint8, device=dev)
        _flush_bufs[key] = buf
    return buf


def flush_cache(device) -> None:
    # Writing (not reading) evicts what the timed call would otherwise find cached.
    flush_buffer(device).fill_(1)


_flush_cost: dict = {}


def flush_seconds(device) -> float:
    """Wall time of one flush (measured once per device), so rep counts can budget for it."""
    import torch

    key = str(torch.device(device))
    if key not in _flush_cost:
        flush_cache(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            flush_cache(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        _flush_cost[key] = (time.perf_counter() - t0) / 3
    return _flush_cost[key]


# --------------------------------------------------------------------------

def _reps_for(per_call_s: float, target_s: float, min_reps: int, max_reps: int) -> int:
    if per_call_s <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, target_s / per_call_s)))


def measure(fn, device="cpu", *, warmup: int = 3, min_reps: int = 10, max_reps: int = 200,
            target_s: float = 0.25, cold_l2: bool = True, graph: bool | None = None,
            graph_below_s: float = 200e-6) -> Timing:
    """Time ``fn()`` on ``device`` (see the module docstring).

    ``target_s`` is the wall time aimed for (warm-up excluded, cache flushes
    included); the number of reps is clamped to [min_reps, max_reps]. ``graph``: None = CUDA-graph replay
    for calls under ``graph_below_s``; True/False force it on/off (GPU only).
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return _measure_cuda(fn, dev, warmup, min_reps, max_reps, target_s, cold_l2, graph, graph_below_s)
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    per = (time.perf_counter() - t0) / max(1, warmup)
    reps = _reps_for(per + (flush_seconds(dev) if cold_l2 else 0.0), target_s, min_reps, max_reps)
    samples = []
    for _ in range(reps):
        if cold_l2:
            flush_cache(dev)
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples, "perf_counter", cold_l2)


def _measure_cuda(fn, dev, warmup, min_reps, max_reps, target_s, cold_l2, graph, graph_below_s) -> Timing:
    import torch

    stream = torch.cuda.current_stream(dev)
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize(dev)
    # per-call estimate with plain events, used for the rep count and the graph decision
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(stream)
    for _ in range(3):
        fn()
    e.record(stream)
    e.synchronize()
    per = s.elapsed_time(e) * 1e-3 / 3
    reps = _reps_for(per + (flush_seconds(dev) if cold_l2 else 0.0), target_s, min_reps, max_reps)

    use_graph = (per < graph_below_s) if graph is None else graph
    run = fn
    timer = "cuda_event"
    if use_graph:
        g = _capture(fn, dev)
        if g is not None:
            run = g.replay
            timer = "cuda_graph"
            for _ in range(2):
                run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cold_l2:
            flush_cache(dev)
        starts[i].record(stream)
        run()
        ends[i].record(stream)
    torch.cuda.synchronize(dev)
    samples = [a.elapsed_time(b) * 1e-3 for a, b in zip(starts, ends)]
    return summarize(samples, timer, cold_l2)


def _capture(fn, dev):
    """A CUDA graph of one call of ``fn``, or None when ``fn`` cannot be captured."""
    import torch

    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize(dev)
        return g
    except Exception:  # noqa: BLE001 - any capture failure means "time without a graph"
        try:
            torch.cuda.synchronize(dev)
        except Exception:  # noqa: BLE001
            pass
        return None

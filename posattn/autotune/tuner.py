"""The tuner: time every candidate launch config of a kernel key, keep the fastest.

For each backend's kernel the candidates are the kernel's heuristic default
plus its ``search_space(key)`` (declared beside the kernel, pruned there).
Each candidate is first run once on poisoned outputs and checked against the
reference kernel; then it is warmed up and timed: the median of repeated
runs, each on the next of several input sets so that the data touched
exceeds the L2 (or last-level CPU) cache. A candidate that fails to compile,
runs out of resources, errors at launch, or disagrees with the reference is
recorded as failed (or mismatch) and never chosen.

Timers: CUDA events on a GPU (behind a ``torch.cuda._sleep`` so that the
events time the GPU, not the host's launch rate); ``time.perf_counter`` on a
CPU.

Each op provides an adapter module (see :mod:`posattn.autotune.ops_rope`):
``input_bytes(key)``, ``make_inputs(key, device, index)``, ``run(kernel,
config, inputs)`` and ``reference_check(key, inputs, run_once) -> str | None``.
"""
from __future__ import annotations

import importlib
import logging
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posattn.autotune import cache as C
from posattn.autotune import fingerprint as F

log = logging.getLogger("posattn.autotune")

_ADAPTERS: dict[str, Any] = {}
_BUILTIN_ADAPTERS = {"rope": "posattn.autotune.ops_rope", "rope_cos_sin": "posattn.autotune.ops_rope_cos_sin"}
_BUILTIN_ADAPTERS["decode_attention"] = "posattn.autotune.ops_decode"
_BUILTIN_ADAPTERS["rope_and_cache"] = "posattn.autotune.ops_cache"
_BUILTIN_ADAPTERS["kv_compact"] = "posattn.autotune.ops_cache"
_BUILTIN_ADAPTERS.update(dict.fromkeys(("topk", "scores", "page_scores"), "posattn.autotune.ops_select"))
_BUILTIN_ADAPTERS["vq_code_scores"] = "posattn.autotune.ops_vq"


def register_adapter(op: str, adapter) -> None:
    """Tell the tuner how to build inputs for ``op`` and check a kernel's output."""
    _ADAPTERS[op] = adapter


def adapter_for(op: str):
    a = _ADAPTERS.get(op)
    if a is None and op in _BUILTIN_ADAPTERS:
        a = importlib.import_module(_BUILTIN_ADAPTERS[op])
        _ADAPTERS[op] = a
    if a is None:
        raise ValueError(f"op {op!r} has no autotune adapter (known: {sorted(set(_ADAPTERS) | set(_BUILTIN_ADAPTERS))})")
    return a


@dataclass
class Settings:
    warmup: int = 4
    min_reps: int = 9
    max_reps: int = 200
    budget_s: float = 0.05          # timed seconds per candidate (about)
    max_sets: int = 1024            # input sets rotated through
    max_input_bytes: int = 1 << 30  # all sets together
    rounds: int = 3                 # timed passes over all candidates: machine drift hits every one alike


@dataclass
class KernelResult:
    """One backend's tuning of one key."""

    op: str
    backend: str
    version: int
    key: Any
    default: dict
    results: list[dict]             # all results known for the key (measured now + reused)
    measured: int = 0               # how many were timed in this run
    error: str = ""                 # why the backend could not be tuned at all

    @property
    def best(self) -> dict | None:
        ok = [r for r in self.results if r["status"] == "ok"]
        return min(ok, key=lambda r: r["time_s"]) if ok else None

    @property
    def default_time(self) -> float | None:
        d = C.canon(self.default)
        for r in self.results:
            if C.canon(r["config"]) == d and r["status"] == "ok":
                return r["time_s"]
        return None

    @property
    def speedup(self) -> float | None:
        b, d = self.best, self.default_time
        return (d / b["time_s"]) if (b and d) else None

    def entry(self) -> dict:
        fields = C.key_fields(self.key)
        return {"op": self.op, "backend": self.backend, "version": self.version, "key": fields,
                "bucket_fields": C.bucket_fields(fields), "default": dict(self.default),
                "results": self.results, "updated": C.now_iso()}


# ---------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def samples(launch: Callable[[int], None], n_sets: int, device: str, reps: int, first: int = 0) -> list[float]:
    """Seconds of ``reps`` launches, launch r on input set ``(first + r) % n_sets``."""
    if device.startswith("cuda"):
        import torch

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:
            # hold the stream while the host enqueues every launch: the events then
            # time the kernels back to back, not the host's launch rate (~50 us/launch
            # of host time at ~2 GHz)
            sleep(int(min(2e8, 1e5 * reps)))
        for r in range(reps):
            starts[r].record()
            launch((first + r) % n_sets)
            ends[r].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) * 1e-3 for a, b in zip(starts, ends)]
    times = []
    pc = time.perf_counter
    for r in range(reps):
        t0 = pc()
        launch((first + r) % n_sets)
        times.append(pc() - t0)
    return times


def warm(launch: Callable[[int], None], n_sets: int, device: str, s: "Settings") -> float:
    """Warm-up launches; returns the fastest one's seconds (host clock, synchronised),
    the estimate that sizes the timed repetitions (a preempted launch must not
    shrink them)."""
    best = math.inf
    for i in range(max(1, s.warmup)):
        t0 = time.perf_counter()
        launch(i % n_sets)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-7)


def measure(launch: Callable[[int], None], n_sets: int, device: str, s: "Settings") -> float:
    """Median seconds of one ``launch(i)`` (i: the input set), after warm-up."""
    est = warm(launch, n_sets, device, s)
    reps = int(min(s.max_reps, max(s.min_reps, s.budget_s / est)))
    return statistics.median(samples(launch, n_sets, device, reps))


def n_input_sets(per_set: int, dev: F.Device, s: Settings) -> int:
    """Enough sets that the rotated data is twice the cache, within the memory budget."""
    per_set = max(1, per_set)
    cache = dev.l2_bytes or ((50 << 20) if dev.kind == "cuda" else (32 << 20))  # unknown: a large L2
    want = math.ceil(2 * cache / per_set)
    cap = max(1, s.max_input_bytes // per_set)
    return int(max(1, min(want, cap, s.max_sets)))


# ---------------------------------------------------------------------------
# one key


def eligible_backends(op: str, key, backends=None) -> list[tuple[str, Any, str]]:
    """[(backend, Kernel or None, why not)] to tune for ``key``.

    Without ``backends``: every usable backend that dispatch would choose on
    its own for this key, except the fp64 reference. Named backends are
    checked as if asked for by name.
    """
    from posattn import dispatch

    ks = dispatch.kernels(op)
    if not ks:
        raise ValueError(f"unknown op {op!r}")
    out = []
    names = list(backends) if backends else [b for b in dispatch.BACKENDS if b in ks and b != "reference"]
    for b in names:
        k = ks.get(b)
        if k is None:
            out.append((b, None, f"op {op!r} has no {b} kernel"))
            continue
        ok, why = dispatch.backend_status(b)
        if ok:
            explicit = bool(backends)
            ok, why = (k.supports(key, explicit=explicit) if dispatch._takes_explicit(k) else k.supports(key))
        if ok and key.dtype not in k.dtypes:
            ok, why = False, f"dtype {key.dtype}"
        out.append((b, k if ok else None, "" if ok else why))
    return out


def candidates(kernel, key, space: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """(default config, [default] + search space without duplicates)."""
    default = dict(kernel.default_config(key))
    if space is None:
        space = list(kernel.search_space(key)) if kernel.search_space is not None else []
    seen, out = set(), []
    for c in [default] + [dict(c) for c in space]:
        k = C.canon(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return default, out


def tune_kernel(op: str, kernel, key, *, device: str, dev: F.Device, existing: dict[str, dict] | None = None,
                force: bool = False, space: list[dict] | None = None, settings: Settings | None = None,
                on_candidate: Callable[[], None] | None = None) -> KernelResult:
    """Time the candidates of one kernel for one key (see the module docstring)."""
    s = settings or Settings()
    adapter = adapter_for(op)
    default, cands = candidates(kernel, key, space)
    existing = dict(existing or {})
    todo = [c for c in cands if force or C.canon(c) not in existing]
    res = KernelResult(op, kernel.backend, kernel.version, key, default, [])
    if todo:
        per_set = int(adapter.input_bytes(key))
        n = n_input_sets(per_set, dev, s)
        sets = [adapter.make_inputs(key, device, i) for i in range(n)]
        try:
            live = []  # [(config, launch, reps)] that passed the check and the warm-up
            for cfg in todo:
                r, launch, est = _check_and_warm(adapter, kernel, key, cfg, sets, device, s)
                if r is not None:
                    existing[C.canon(cfg)] = r
                    res.measured += 1
                    if on_candidate:
                        on_candidate()
                else:
                    reps = int(min(s.max_reps, max(s.min_reps, s.budget_s / est)))
                    live.append((cfg, launch, max(1, math.ceil(reps / s.rounds))))
            times: dict[str, list[float]] = {C.canon(c): [] for c, _, _ in live}
            failed: dict[str, dict] = {}
            for rnd in range(s.rounds):
                for cfg, launch, reps in live:
                    k = C.canon(cfg)
                    if k in failed:
                        continue
                    try:
                        times[k] += samples(launch, len(sets), device, reps, first=rnd * reps)
                    except Exception as e:
                        failed[k] = _failed(cfg, e, device)
            for cfg, _, _ in live:
                k = C.canon(cfg)
                t = statistics.median(times[k]) if times[k] else float("nan")
                if k in failed:
                    existing[k] = failed[k]
                elif not (t > 0 and math.isfinite(t)):
                    existing[k] = {"config": cfg, "status": "failed", "time_s": None, "error": f"timer gave {t!r}"}
                else:
                    existing[k] = {"config": cfg, "status": "ok", "time_s": float(t), "error": ""}
                res.measured += 1
                if on_candidate:
                    on_candidate()
        finally:
            del sets
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
    # keep the results of configs still in the space, and any others already stored
    res.results = list(existing.values())
    return res


def _check_and_warm(adapter, kernel, key, cfg, sets, device, s: Settings):
    """(failure result or None, launch function, one launch's seconds)."""
    def launch(i):
        adapter.run(kernel, cfg, sets[i])

    def run_once():
        launch(0)
        _sync(device)

    try:
        bad = adapter.reference_check(key, sets[0], run_once)
    except Exception as e:  # compile error, out of resources, launch error
        return _failed(cfg, e, device), launch, 0.0
    if bad:
        return {"config": cfg, "status": "mismatch", "time_s": None, "error": str(bad)[:300]}, launch, 0.0
    try:
        est = warm(launch, len(sets), device, s)
    except Exception as e:
        return _failed(cfg, e, device), launch, 0.0
    return None, launch, est


def _failed(cfg, e: BaseException, device: str) -> dict:
    msg = f"{type(e).__name__}: {e}".strip()
    log.debug("posattn autotune: config %s failed: %s\n%s", cfg, msg, traceback.format_exc())
    if device.startswith("cuda"):
        try:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:
            pass
    return {"config": cfg, "status": "failed", "time_s": None, "error": msg[:300]}


def header_for(dev: F.Device) -> dict:
    return {"fingerprint": dev.fingerprint,
            "device": {"kind": dev.kind, "name": dev.name, "slug": dev.slug, "capability": dev.capability,
                       "sm_count": dev.sm_count, "cores": dev.cores},
            "versions": F.versions(dev), "updated": C.now_iso()}


def target_path(dev: F.Device, directory: Path | None = None) -> Path:
    return (directory or C.write_dir()) / f"{dev.fingerprint}.json"


def stored_results(path: Path, op: str, backend: str, version: int, key) -> dict[str, dict]:
    """{canonical config: result} already in the file for this entry (same kernel version)."""
    doc = C.read_file(path, writable=True)
    if doc is None:
        return {}
    want = (op, backend, version, C.key_items(key))
    for e in doc["entries"]:
        if C.entry_id(e) == want:
            return {C.canon(r["config"]): r for r in e["results"]}
    return {}


def tune_key(op: str, key, *, backends=None, device: str | None = None, force: bool = False,
             spaces: dict[str, list[dict]] | None = None, settings: Settings | None = None,
             write: bool = True, directory: Path | None = None,
             on_candidate: Callable[[], None] | None = None) -> list[KernelResult]:
    """Tune every eligible backend of ``op`` for ``key`` and write the results.

    ``device``: "cpu", "cuda" or "cuda:N" (default: from ``key.device_type``).
    ``spaces``: per backend, a search space replacing the kernel's own.
    ``force``: re-time configs that already have a result.
    The file is written once, after the key is finished (under its lock).
    """
    device = device or key.device_type
    if device.startswith("cuda"):
        import torch

        idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        dev = F.cuda_device(idx)
        device = f"cuda:{idx}"
    else:
        dev = F.cpu_device()
    path = target_path(dev, directory)
    out = []
    for b, k, why in eligible_backends(op, key, backends):
        if k is None:
            out.append(KernelResult(op, b, 0, key, {}, [], error=why))
            continue
        prev = stored_results(path, op, b, k.version, key) if not force else {}
        space = (spaces or {}).get(b)
        if device.startswith("cuda"):
            import torch

            with torch.cuda.device(dev_index(device)):
                r = tune_kernel(op, k, key, device=device, dev=dev, existing=prev, force=force, space=space,
                                settings=settings, on_candidate=on_candidate)
        else:
            r = tune_kernel(op, k, key, device=device, dev=dev, existing=prev, force=force, space=space,
                            settings=settings, on_candidate=on_candidate)
        out.append(r)
    if write:
        ents = [r.entry() for r in out if not r.error and r.results]
        if ents:
            C.write_entries(path, header_for(dev), ents)
    return out


def dev_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def count_candidates(op: str, key, backends=None, spaces=None) -> int:
    n = 0
    for b, k, _ in eligible_backends(op, key, backends):
        if k is not None:
            n += len(candidates(k, key, (spaces or {}).get(b))[1])
    return n

"""``posattn tune``'s work: the jobs (op, key) of each device, tuning them in this process
or in one spawned worker process per device, and the result rows."""
from __future__ import annotations

from dataclasses import dataclass

from posattn.autotune import keys as K
from posattn.autotune.output import progress


@dataclass(frozen=True)
class Job:
    op: str
    key: object


def jobs_for(ops, shape, dtype, tokens, device: str) -> list[Job]:
    dt = "cuda" if device.startswith("cuda") else "cpu"
    return [Job(op, k) for op in ops for k in K.keys_for(op, shape, dtype, tokens, dt)]


def _rows(device: str, job: Job, results) -> list[dict]:
    rows = []
    best_b = None
    bests = [(r.best["time_s"], r.backend) for r in results if r.best]
    if bests:
        best_b = min(bests)[1]
    for r in results:
        b = r.best
        rows.append({
            "device": device, "op": job.op, "backend": r.backend, "key": K.describe_key(job.key),
            "config": b["config"] if b else None, "time_us": b["time_s"] * 1e6 if b else None,
            "default": r.default or None, "default_us": (r.default_time * 1e6) if r.default_time else None,
            "speedup": r.speedup, "measured": r.measured,
            "failed": sum(1 for x in r.results if x["status"] != "ok"),
            "chosen": r.backend == best_b,
            "status": "skipped" if r.error else ("ok" if b else "error"), "note": r.error,
        })
    return rows


def _work(device: str, jobs: list[Job], backends, force, budget_s, report) -> list[dict]:
    """Tune ``jobs`` on one device; ``report(kind, value)`` gets progress."""
    from posattn.autotune import tuner

    settings = tuner.Settings(budget_s=budget_s)
    rows = []
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(int(device.split(":")[1]))
    for job in jobs:
        n = tuner.count_candidates(job.op, job.key, backends)
        done = [0]

        def step():
            done[0] += 1
            report("advance", 1)

        res = tuner.tune_key(job.op, job.key, backends=backends, device=device, force=force, settings=settings,
                             on_candidate=step)
        report("advance", n - done[0])  # candidates reused from the cache
        rows += _rows(device, job, res)
    return rows


def _worker_main(device, jobs, backends, force, budget_s, queue) -> None:
    try:
        rows = _work(device, jobs, backends, force, budget_s, lambda kind, v: queue.put((kind, device, v)))
        queue.put(("done", device, rows))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", device, f"{type(e).__name__}: {e}"))


def run_tuning(ops, shape, dtype, tokens, devices, *, backends=None, force=False, budget_s=0.05,
               show_progress=True, processes: bool | None = None) -> list[dict]:
    """Tune every key on every device; one worker process per device when there are several."""
    from posattn.autotune import tuner

    plan = {d: jobs_for(ops, shape, dtype, tokens, d) for d in devices}
    total = sum(tuner.count_candidates(j.op, j.key, backends) for js in plan.values() for j in js)
    bar_ = progress(show_progress, total, devices)
    rows: list[dict] = []
    use_procs = (len(devices) > 1) if processes is None else processes
    with bar_ as bar:
        if not use_procs:
            for d in devices:
                rows += _work(d, plan[d], backends, force, budget_s, lambda kind, v: bar.advance(v))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            procs = [ctx.Process(target=_worker_main, args=(d, plan[d], backends, force, budget_s, q), daemon=True)
                     for d in devices]
            for p in procs:
                p.start()
            pending = set(devices)
            errors = []
            while pending:
                try:
                    kind, dev, val = q.get(timeout=1.0)
                except Exception:
                    dead = [d for d, p in zip(devices, procs) if d in pending and not p.is_alive()]
                    for d in dead:
                        errors.append(f"{d}: worker exited with code {procs[devices.index(d)].exitcode}")
                        pending.discard(d)
                    continue
                if kind == "advance":
                    bar.advance(val)
                elif kind == "done":
                    rows += val
                    pending.discard(dev)
                elif kind == "error":
                    errors.append(f"{dev}: {val}")
                    pending.discard(dev)
            for p in procs:
                p.join(timeout=10)
            for e in errors:
                rows.append({"device": e.split(":")[0], "op": "", "backend": "", "key": "", "config": None,
                             "time_us": None, "default": None, "default_us": None, "speedup": None, "measured": 0,
                             "failed": 0, "chosen": False, "status": "error", "note": e})
    from posattn import autotune

    autotune.reload()  # this process's dispatch sees the new results
    return rows

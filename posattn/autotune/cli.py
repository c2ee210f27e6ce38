"""``posattn tune`` and ``posattn cache``.

This is the command layer: unlike the rest of posattn.autotune it may import
the public ops (to build their kernel keys).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path

from posattn.lowered import token_bucket

log = logging.getLogger("posattn.autotune")

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32", "fp64": "float64", "float64": "float64"}
OPS = ("rope", "rope_cos_sin", "decode_attention")


def add_parsers(sub) -> None:
    p = sub.add_parser("tune", help="tune launch configs for a model's shapes on this machine's devices",
                       description="Build the kernel keys a model needs, time every candidate config of every "
                                   "usable backend, and write the results to the tuning cache.")
    p.add_argument("--ops", default="rope", help=f"comma-separated ops to tune ({', '.join(OPS)})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-config", metavar="PATH", help="a transformers config.json")
    src.add_argument("--preset", metavar="NAME", help="a built-in model (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 | fp64 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (B*S); each is tuned at its "
                                                  "power-of-two bucket (default: 1,16,256,4096,65536)")
    p.add_argument("--devices", default=None, help="comma-separated CUDA device indices, or 'cpu' "
                                                   "(default: the current GPU, else the CPU)")
    p.add_argument("--backends", default=None, help="comma-separated backends to tune (default: every usable "
                                                    "backend dispatch would choose by itself; not the reference)")
    p.add_argument("--force", action="store_true", help="re-time configs that already have a result")
    p.add_argument("--budget-ms", type=float, default=None, help="timed milliseconds per candidate (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="a short run for demos: llama3-8b shapes (unless given), fp32 at 16 and 256 tokens on "
                        "CPU (bf16 at 256 and 4096 on GPU), 20 ms per candidate")
    p.add_argument("--json", action="store_true", help="print the final table as JSON")
    p.set_defaults(func=_tune_cmd)

    c = sub.add_parser("cache", help="show, validate, clear or export the tuning cache")
    csub = c.add_subparsers(dest="cache_command", required=True)
    s = csub.add_parser("show", help="list the cached entries of this machine's devices")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="every config's result, not only the best")
    s.set_defaults(func=_cache_show)
    v = csub.add_parser("validate", help="check cache files against the schema (changes nothing)")
    v.add_argument("files", nargs="*", help="files to check (default: every cache file in every layer)")
    v.set_defaults(func=_cache_validate)
    cl = csub.add_parser("clear", help="remove the user cache (not $POSATTN_TUNE_DIR, not shipped configs)")
    cl.set_defaults(func=_cache_clear)
    e = csub.add_parser("export", help="write the user's entries in the shipped-config format (<gpu-slug>.json)")
    e.add_argument("-o", "--out", default="tune-export",
                   help="output folder (copy its files into posattn/autotune/configs/ to ship them)")
    e.set_defaults(func=_cache_export)


# ---------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class ModelShape:
    heads_q: int
    heads_k: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    source: str


def _load_hf_config(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--hf-config: cannot read {p} ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--hf-config: {p} is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--hf-config: {p} must hold a JSON object")
    return cfg


def model_shape(cfg: dict, source: str) -> ModelShape:
    """Heads, head_dim and the rotary spec of a transformers config (dict)."""
    import posattn

    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}

    def need_int(*names, default=None):
        for n in names:
            v = cfg.get(n)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"{source}: {n} must be a positive int, got {v!r}")
                return v
        if default is not None:
            return default
        raise ValueError(f"{source}: needs {' or '.join(names)}")

    hq = need_int("num_attention_heads", "n_head", "num_heads")
    hk = need_int("num_key_value_heads", "num_kv_heads", default=hq)
    hd = cfg.get("head_dim")
    if hd is None:
        hd = need_int("hidden_size", "n_embd") // hq
    elif isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
        raise ValueError(f"{source}: head_dim must be a positive int, got {hd!r}")
    spec = None
    if hasattr(posattn.RopeSpec, "from_hf_config"):
        try:
            spec = posattn.RopeSpec.from_hf_config(cfg)
        except Exception as e:
            log.warning("posattn tune: RopeSpec.from_hf_config(%s) failed (%s); using a plain RopeSpec", source, e)
    if spec is None:
        rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        base = cfg.get("rope_theta", rp.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
        frac = cfg.get("partial_rotary_factor", rp.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
        rot = cfg.get("rotary_dim") or int(hd * float(frac))
        rot -= rot % 2
        interleaved = cfg.get("model_type") in ("gptj", "codegen")
        spec = posattn.RopeSpec(hd, rot, base=float(base), interleaved=interleaved)
        scaling = cfg.get("rope_scaling") or rp
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
        if kind and kind != "default":
            log.warning("posattn tune: %s: rope scaling %r ignored (posattn.RopeSpec.from_hf_config is not "
                        "available); the kernel keys do not depend on it for plain rope", source, kind)
    return ModelShape(hq, hk, hd, spec.rotary_dim, spec.interleaved, source)



def make_key(cls, **values):
    """A kernel key of dataclass ``cls`` from named values; fields not named take
    their defaults, and a field with neither is an error naming it."""
    kw = {f.name: values[f.name] for f in dc_fields(cls) if f.name in values}
    missing = [f.name for f in dc_fields(cls) if f.name not in values and _no_default(f)]
    if missing:
        raise ValueError(f"posattn tune does not know how to fill {cls.__name__} fields {missing}; "
                         "update posattn/autotune/cli.py")
    return cls(**kw)


def _no_default(f) -> bool:
    import dataclasses

    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def rope_keys(shape: ModelShape, dtype: str, tokens: list[int], device_type: str) -> list:
    from posattn.rope.ops import RopeKey

    out = []
    for b in sorted({token_bucket(t) for t in tokens}):
        out.append(make_key(RopeKey, device_type=device_type, dtype=dtype, head_dim=shape.head_dim,
                            rotary_dim=shape.rotary_dim, interleaved=shape.interleaved, heads_q=shape.heads_q,
                            heads_k=shape.heads_k, pos_dtype="int64", tokens_bucket=b))
    return out


def cos_sin_keys(shape: ModelShape, dtype: str, tokens: list[int], device_type: str) -> list:
    """Keys of apply_rope_cos_sin in its two common forms: a float32 cos_sin_cache indexed by
    int64 positions (vLLM / FlashInfer) and transformers' per-token [B, S, D] cos/sin in the
    model's dtype (each half of a pair read from its own half of the table)."""
    from posattn.rope.cos_sin import CosSinKey

    out = []
    for b in sorted({token_bucket(t) for t in tokens}):
        for table_dtype, split, pos_dtype in (("float32", False, "int64"), (dtype, True, "")):
            out.append(make_key(CosSinKey, device_type=device_type, dtype=dtype, table_dtype=table_dtype,
                                head_dim=shape.head_dim, rotary_dim=shape.rotary_dim,
                                interleaved=shape.interleaved, split=split, pos_dtype=pos_dtype,
                                heads_q=shape.heads_q, heads_k=shape.heads_k, tokens_bucket=b))
    return out


def describe_key(key) -> str:
    from posattn.autotune import cache as C

    import dataclasses

    f = C.key_fields(key)
    # fields at their dataclass default (n_axes=1, rows=1, dpe=False, ...) say nothing
    defaults = ({fl.name: fl.default for fl in dataclasses.fields(key) if fl.default is not dataclasses.MISSING}
                if dataclasses.is_dataclass(key) else {})
    short = {"device_type": None, "dtype": "", "head_dim": "D", "rotary_dim": "R", "heads_q": "Hq", "heads_k": "Hk",
             "pos_dtype": None, "tokens_bucket": "T", "interleaved": None}
    parts = []
    for k, v in f.items():
        if k in ("interleaved", "split"):
            if v:
                parts.append("inter" if k == "interleaved" else "split")
            continue
        if k == "table_dtype":
            parts.append(f"table={v}")
            continue
        if k == "pos_dtype" and "table_dtype" in f:  # cos/sin: cache + positions, or per-token tables
            parts.append(f"pos={v}" if v else "per-token")
            continue
        if k in defaults and v == defaults[k]:
            continue
        lab = short.get(k, k + "=")
        if lab is None:
            continue
        if k == "rotary_dim" and v == f.get("head_dim"):
            continue
        parts.append(f"{lab}{v}" if lab else str(v))
    return " ".join(parts)


# ---------------------------------------------------------------------------
# posattn tune


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _tune_cmd(args) -> int:
    from posattn.autotune import presets

    if args.list_presets:
        for n in presets.names():
            print(n, json.dumps(presets.get(n)))
        return 0
    import torch

    ops = _csv(args.ops) or ["rope"]
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops: {op!r} cannot be tuned yet (tunable: {', '.join(OPS)})")
    if args.devices:
        devs = _csv(args.devices)
        if devs == ["cpu"]:
            devices = ["cpu"]
        else:
            try:
                idx = [int(d) for d in devs]
            except ValueError:
                raise ValueError(f"--devices must be CUDA indices like 0,1 or 'cpu'; got {args.devices!r}") from None
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ValueError(f"--devices: {bad} not visible here ({n} CUDA device(s))")
            devices = [f"cuda:{i}" for i in idx]
    else:
        devices = [f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else ["cpu"]
    on_gpu = devices[0].startswith("cuda")
    if args.hf_config:
        shape = model_shape(_load_hf_config(args.hf_config), args.hf_config)
    elif args.preset or args.quick:
        name = args.preset or "llama3-8b"
        shape = model_shape(presets.get(name), f"preset {name}")
    else:
        raise ValueError("give --hf-config PATH or --preset NAME (or --quick)")
    dt = args.dtype or ("bf16" if on_gpu else "fp32")
    if dt.lower() not in DTYPES:
        raise ValueError(f"--dtype must be one of bf16, fp16, fp32, fp64; got {args.dtype!r}")
    dtype = DTYPES[dt.lower()]
    if args.tokens:
        try:
            tokens = [int(t) for t in _csv(args.tokens)]
        except ValueError:
            raise ValueError(f"--tokens must be comma-separated integers; got {args.tokens!r}") from None
        if any(t <= 0 for t in tokens):
            raise ValueError(f"--tokens must be positive; got {args.tokens!r}")
    else:
        tokens = ([256, 4096] if on_gpu else [16, 256]) if args.quick else [1, 16, 256, 4096, 65536]
    budget = args.budget_ms if args.budget_ms is not None else (20.0 if args.quick else 50.0)
    if budget <= 0:
        raise ValueError(f"--budget-ms must be positive; got {budget}")
    backends = _csv(args.backends) or None
    rows = run_tuning(ops, shape, dtype, tokens, devices, backends=backends, force=args.force,
                      budget_s=budget / 1000.0, show_progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0 if all(r["status"] != "error" for r in rows) else 1


@dataclass(frozen=True)
class Job:
    op: str
    key: object


def jobs_for(ops, shape, dtype, tokens, device: str) -> list[Job]:
    dt = "cuda" if device.startswith("cuda") else "cpu"
    out = []
    for op in ops:
        if op == "rope":
            out += [Job(op, k) for k in rope_keys(shape, dtype, tokens, dt)]
        elif op == "rope_cos_sin":
            out += [Job(op, k) for k in cos_sin_keys(shape, dtype, tokens, dt)]
        elif op == "decode_attention":   # decode steps over caches of `tokens` slots
            from posattn.autotune import ops_decode
            out += [Job(op, k) for k in ops_decode.keys(shape, dtype, tokens, dt)]
    return out


def _rows(device: str, job: Job, results) -> list[dict]:
    rows = []
    best_b = None
    bests = [(r.best["time_s"], r.backend) for r in results if r.best]
    if bests:
        best_b = min(bests)[1]
    for r in results:
        b = r.best
        rows.append({
            "device": device, "op": job.op, "backend": r.backend, "key": describe_key(job.key),
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
    progress = _progress(show_progress, total, devices)
    rows: list[dict] = []
    use_procs = (len(devices) > 1) if processes is None else processes
    with progress as bar:
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


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def advance(self, n):
        pass


class _Bar:
    def __init__(self, total, label):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]tuning[/bold] " + label), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=False)
        self._t = self._p.add_task("tune", total=total)

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *a):
        return self._p.__exit__(*a)

    def advance(self, n):
        if n:
            self._p.advance(self._t, n)


def _progress(show: bool, total: int, devices):
    return _Bar(total, ",".join(devices)) if show and total else _NoBar()


def _fmt_cfg(c) -> str:
    return "" if not c else " ".join(f"{k}={v}" for k, v in c.items())


def _print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    from posattn.autotune import cache as C

    t = Table(title=f"posattn tune  (results in {C.write_dir()})")
    for col in ("device", "op", "key", "backend", "chosen config", "time (us)", "default (us)", "speed-up", "notes"):
        t.add_column(col, justify="right" if col in ("time (us)", "default (us)", "speed-up") else "left")
    for r in rows:
        if r["status"] == "skipped":
            continue
        notes = []
        if r["chosen"]:
            notes.append("fastest backend")
        if r["measured"] == 0 and r["status"] == "ok":
            notes.append("cached")
        if r["failed"]:
            notes.append(f"{r['failed']} failed")
        if r["note"]:
            notes.append(r["note"])
        t.add_row(r["device"], r["op"], r["key"], r["backend"], _fmt_cfg(r["config"]),
                  f"{r['time_us']:.1f}" if r["time_us"] else "-",
                  f"{r['default_us']:.1f}" if r["default_us"] else "-",
                  f"{r['speedup']:.2f}x" if r["speedup"] else "-", ", ".join(notes))
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    skipped = sorted({(r["backend"], r["note"]) for r in rows if r["status"] == "skipped"})
    for b, why in skipped:
        print(f"  not tuned: {b} ({why})")


# ---------------------------------------------------------------------------
# posattn cache


def _layer_files() -> list[tuple[str, Path, bool]]:
    from posattn.autotune import cache as C

    out = []
    td = C.tune_dir_env()
    for name, d, w in (("POSATTN_TUNE_DIR", td, True), ("user", C.user_cache_dir(), True),
                       ("shipped", C.shipped_dir(), False)):
        if d is not None and d.is_dir():
            out += [(name, p, w) for p in sorted(d.glob("*.json"))]
    return out


def _current_versions() -> dict:
    from posattn import dispatch

    return {(op, b): k.version for op, ks in dispatch.kernels().items() for b, k in ks.items()}


def _cache_show(args) -> int:
    from posattn.autotune import cache as C

    vers = _current_versions()
    rows = []
    for layer, path, _w in _layer_files():
        doc, why = C.parse(path.read_bytes())
        if doc is None:
            rows.append({"layer": layer, "file": str(path), "error": why})
            continue
        for e in doc["entries"]:
            best = C.best_result(e)
            dflt = C.default_result(e)
            cur = vers.get((e["op"], e["backend"]))
            row = {"layer": layer, "file": str(path), "fingerprint": doc["header"]["fingerprint"], "op": e["op"],
                   "backend": e["backend"], "version": e["version"],
                   "stale": cur is not None and cur != e["version"],
                   "key": e["key"], "best": best, "default": dflt,
                   "speedup": (dflt["time_s"] / best["time_s"]) if best and dflt and dflt["status"] == "ok" else None}
            if args.all:
                row["results"] = e["results"]
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no cache files (looked in: {C.tune_dir_env() or '-'}, {C.user_cache_dir()}, {C.shipped_dir()})")
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="posattn tuning cache")
    for col in ("layer", "fingerprint", "op", "backend", "key", "best config", "time (us)", "speed-up", "notes"):
        t.add_column(col)
    for r in rows:
        if "error" in r:
            t.add_row(r["layer"], Path(r["file"]).name, "", "", "", "", "", "", "INVALID: " + r["error"])
            continue
        key = " ".join(f"{k}={v}" for k, v in r["key"].items() if k != "device_type")
        b = r["best"]
        t.add_row(r["layer"], r["fingerprint"], r["op"], f"{r['backend']} v{r['version']}", key,
                  _fmt_cfg(b["config"]) if b else "all failed", f"{b['time_s'] * 1e6:.1f}" if b else "-",
                  f"{r['speedup']:.2f}x" if r["speedup"] else "-", "stale (kernel changed)" if r["stale"] else "")
        if args.all:
            for x in r["results"]:
                t.add_row("", "", "", "", "", _fmt_cfg(x["config"]),
                          f"{x['time_s'] * 1e6:.1f}" if x["time_s"] else "-", "", x["status"] + " " + x.get("error", ""))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    return 0


def _cache_validate(args) -> int:
    from posattn.autotune import cache as C

    files = [("file", Path(f), False) for f in args.files] if args.files else _layer_files()
    if not files:
        print("no cache files to check")
        return 0
    bad = 0
    for layer, path, _ in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            print(f"ERROR {path}: {e}")
            bad += 1
            continue
        doc, why = C.parse(raw)
        if doc is None:
            print(f"ERROR {path} ({layer}): {why}")
            bad += 1
        else:
            print(f"ok    {path} ({layer}): {len(doc['entries'])} entries, {doc['header']['fingerprint']}")
    return 1 if bad else 0


def _cache_clear(args) -> int:
    from posattn.autotune import cache as C

    d = C.user_cache_dir()
    if not d.exists():
        print(f"nothing to clear ({d} does not exist)")
        return 0
    shutil.rmtree(d)
    print(f"removed {d}")
    if C.tune_dir_env():
        print(f"(kept $POSATTN_TUNE_DIR={C.tune_dir_env()})")
    return 0


def export_entries(docs: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """{slug: (header, entries)}: each entry keeps its best and its default result."""
    from posattn.autotune import cache as C

    out: dict[str, tuple[dict, list[dict]]] = {}
    for doc in docs:
        dev = dict(doc["header"].get("device") or {})
        slug = dev.get("slug") or doc["header"]["fingerprint"]
        keep = []
        for e in doc["entries"]:
            best = C.best_result(e)
            if best is None:
                continue
            dflt = C.default_result(e)
            res = [best] + ([dflt] if dflt is not None and dflt is not best else [])
            keep.append({**e, "results": res})
        hdr = {"fingerprint": slug, "device": dev, "versions": doc["header"].get("versions", {}),
               "exported_from": doc["header"]["fingerprint"]}
        prev = out.get(slug)
        out[slug] = (hdr, (prev[1] if prev else []) + keep)
    return out


def _cache_export(args) -> int:
    from posattn.autotune import cache as C

    docs = []
    for layer, path, writable in _layer_files():
        if not writable:
            continue
        doc = C.read_file(path, writable=True)
        if doc is not None:
            docs.append(doc)
    if not docs:
        print("no user cache entries to export (run `posattn tune` first)")
        return 1
    out = Path(args.out)
    for slug, (hdr, ents) in sorted(export_entries(docs).items()):
        path = out / f"{slug}.json"
        C.write_entries(path, hdr, ents)
        print(f"wrote {path} ({len(ents)} entries)")
    print("copy these files into posattn/autotune/configs/ to ship them with the package")
    return 0

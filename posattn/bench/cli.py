"""`posattn bench` and `posattn dashboard`.

    posattn bench --quick                     # the small sweep (about a minute on a CPU)
    posattn bench                             # the full sweep (for GPUs), every importable peer
    posattn bench --op rope --backend cpu --dtype float32 --shape B=1,S=1024,Hq=32,Hk=8,D=128
    posattn dashboard bench-out/results.jsonl benchmarks/results -o bench-out
"""
from __future__ import annotations

import sys
from pathlib import Path


def _csv(values):
    if not values:
        return None
    out = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out or None


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="time the catalogue here against its peers; write results and a dashboard",
                       description="Time every op on every usable backend and importable peer, check each "
                                   "against the fp64 reference, append/upsert long-format JSON lines and "
                                   "write an HTML dashboard.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small sweep (about a minute on a CPU)")
    mode.add_argument("--full", action="store_true", help="the full sweep (the default)")
    p.add_argument("-o", "--out", default="bench-out", help="output directory (default: bench-out)")
    p.add_argument("--results", default=None, help="results JSONL to upsert into (default: OUT/results.jsonl)")
    p.add_argument("--op", action="append", help="op(s) to time (default: all)")
    p.add_argument("--backend", action="append",
                   help="backend(s)/peer(s) to time, comma-separated (default: every usable one)")
    p.add_argument("--dtype", action="append", help="dtype(s), e.g. bfloat16,float32 (default: the sweep's)")
    p.add_argument("--shape", action="append", help="a shape, e.g. B=1,S=4096,Hq=32,Hk=8,D=128 (repeatable)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-peers", action="store_true", help="time posattn's backends only")
    p.add_argument("--warm-l2", action="store_true", help="do not flush the cache before each timed run")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop starting new cases after S seconds (results so far are kept)")
    p.add_argument("--target-s", type=float, default=None, help="timed seconds per measurement")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="RESULTS",
                   help="more result files/directories to show beside this run in the dashboard")
    p.add_argument("--no-dashboard", action="store_true", help="write results only")
    p.set_defaults(func=run_bench)

    d = sub.add_parser("dashboard", help="render result files into one self-contained HTML page",
                       description="Render one or more results JSONL files (or directories of them) into "
                                   "DIR/index.html: one offline page, charts drawn as inline SVG.")
    d.add_argument("results", nargs="+", help="results JSONL files or directories")
    d.add_argument("-o", "--out", default="bench-out", help="output directory (default: bench-out)")
    d.add_argument("--title", default="posattn benchmarks")
    d.add_argument("--screenshot", action="store_true",
                   help="also save DIR/dashboard.png with headless chromium (when installed)")
    d.set_defaults(func=run_dashboard)


def run_bench(args) -> int:
    from posattn.bench import runner, summary

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else out / "results.jsonl"
    cfg = runner.RunConfig(
        mode="quick" if args.quick else "full", device=args.device, ops=_csv(args.op),
        impls=_csv(args.backend), dtypes=_csv(args.dtype), shapes=args.shape, peers=not args.no_peers,
        cold_l2=not args.warm_l2, time_budget_s=args.time_budget, results_path=results_path,
        target_s=args.target_s)
    res = runner.run(cfg, log=lambda m: print(m, flush=True))
    print(f"results: {results_path} ({len(res.rows)} rows from this run)", flush=True)
    if not args.no_dashboard and results_path.exists():
        from posattn.bench import dashboard

        page = dashboard.write([results_path, *args.with_], out)
        print(f"dashboard: {page}", flush=True)
    print(summary.text(res.rows, res.skipped, res.errors, truncated=res.truncated), flush=True)
    return 0 if res.rows else 1


def run_dashboard(args) -> int:
    from posattn.bench import dashboard

    page = dashboard.write(args.results, Path(args.out), title=args.title)
    print(f"dashboard: {page}")
    if args.screenshot:
        from posattn.bench import browser

        exe = browser.find_chromium()
        if exe is None:
            print("no chromium found: no screenshot", file=sys.stderr)
            return 0
        report = browser.check_page(page, screenshot=Path(args.out) / "dashboard.png", chromium=exe)
        print(f"screenshot: {report.screenshot}; charts drawn {report.charts_drawn}/{len(report.charts)}; "
              f"console errors: {len(report.errors)}")
        for e in report.errors:
            print(f"  {e}", file=sys.stderr)
        return 0 if report.ok else 1
    return 0

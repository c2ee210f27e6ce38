"""`posattn bench`: time the catalogue on this machine's device and write an HTML table.

Minimal first version (walking skeleton): apply_rope across the usable
backends on a few shapes, median of repeated runs with perf_counter (CPU) or
CUDA events (GPU).
"""
from __future__ import annotations

import html
import json
import os
import statistics
import time
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="time the catalogue on this machine and write a dashboard")
    p.add_argument("--quick", action="store_true", help="a small sweep (about a minute on CPU)")
    p.add_argument("-o", "--out", default="bench-out", help="output directory")
    p.set_defaults(func=run)


def _time(fn, device, reps, warmup=2):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> int:
    import torch

    import posattn
    from posattn import dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = [1, 256, 4096] if args.quick else [1, 256, 4096, 16384, 65536]
    hq, hk, d = 32, 8, 128
    spec = posattn.RopeSpec(d)
    rows = []
    for name in dispatch.BACKENDS:
        ok, why = dispatch.backend_status(name)
        if not ok or name not in dispatch.kernels("rope"):
            continue
        if device == "cpu" and name in ("triton", "cuda"):
            continue
        for n in tokens:
            q = torch.randn(1, n, hq, d, device=device, dtype=dtype)
            k = torch.randn(1, n, hk, d, device=device, dtype=dtype)
            pos = torch.arange(n, device=device)
            reps = 5 if name == "reference" else 20
            t = _time(lambda: posattn.apply_rope(q, k, pos, spec, backend=name), device, reps)
            nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
            rows.append({"op": "rope", "backend": name, "tokens": n, "dtype": str(dtype)[6:],
                         "median_s": t, "GB/s": nbytes / t / 1e9})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = "".join(
        f"<tr><td>{html.escape(r['op'])}</td><td>{r['backend']}</td><td>{r['tokens']}</td>"
        f"<td>{r['dtype']}</td><td>{r['median_s'] * 1e6:.1f}</td><td>{r['GB/s']:.2f}</td></tr>"
        for r in rows)
    (out / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>posattn bench</title></head><body>"
        f"<h1>posattn bench ({device})</h1><table border='1'><tr><th>op</th><th>backend</th>"
        f"<th>tokens</th><th>dtype</th><th>median µs</th><th>GB/s</th></tr>{body}</table></body></html>")
    for r in rows:
        print(f"{r['op']:6} {r['backend']:10} {r['tokens']:7d} {r['median_s'] * 1e6:10.1f} us {r['GB/s']:8.2f} GB/s")
    print(f"wrote {out / 'index.html'}")
    return 0

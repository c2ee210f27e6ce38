"""``posattn cache``: show, validate, clear and export the tuning cache files."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from posattn.autotune.output import fmt_config


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


def show(args) -> int:
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
                  fmt_config(b["config"]) if b else "all failed", f"{b['time_s'] * 1e6:.1f}" if b else "-",
                  f"{r['speedup']:.2f}x" if r["speedup"] else "-", "stale (kernel changed)" if r["stale"] else "")
        if args.all:
            for x in r["results"]:
                t.add_row("", "", "", "", "", fmt_config(x["config"]),
                          f"{x['time_s'] * 1e6:.1f}" if x["time_s"] else "-", "", x["status"] + " " + x.get("error", ""))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    return 0


def validate(args) -> int:
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


def clear(args) -> int:
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


def export(args) -> int:
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

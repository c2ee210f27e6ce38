"""A short plain-text summary of a run: per op, shape and dtype, the fastest
posattn backend against each peer (latency, GB/s, % roofline, speed-up)."""
from __future__ import annotations

from collections import defaultdict

from posattn.bench import roofline


def _fmt_us(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us"


def best_posattn(rows: list[dict]) -> dict:
    """{(op, (device slug, source), shape_key, dtype): latency row of the fastest posattn backend}."""
    best: dict = {}
    for r in rows:
        if r.get("metric") != "latency" or r.get("kind") != "posattn" or r.get("backend") == "reference":
            continue
        k = (r["op"], _set_of(r), r["shape_key"], r["dtype"])
        if k not in best or r["p50"] < best[k]["p50"]:
            best[k] = r
    return best


def text(rows: list[dict], skipped=(), errors=(), truncated: bool = False) -> str:
    lat = defaultdict(dict)
    other = defaultdict(dict)
    for r in rows:
        k = (r["op"], _set_of(r), r["shape_key"], r["dtype"])
        if r["metric"] == "latency":
            lat[k][r["backend"]] = r
        elif r["metric"] in ("throughput", "roofline", "max_abs_err"):
            other[(k, r["backend"])][r["metric"]] = r["p50"]
            if r["metric"] == "roofline":
                other[(k, r["backend"])]["roofline_row"] = r
    best = best_posattn(rows)
    peers = sorted({r["backend"] for r in rows if r.get("kind") == "peer" and r["metric"] == "latency"})
    lines = ["", "== summary: fastest posattn backend vs peers (p50 latency; peer column = posattn speed-up) =="]
    sets = sorted({k[1] for k in lat})
    head = f"{'op':6} {'shape':26} {'dtype':9} {'posattn':16} {'latency':>10} {'GB/s':>9} {'roof%':>8}"
    for p in peers:
        head += f" {p[:14]:>14}"
    lines.append(head)
    last_set = None
    for k in sorted(lat, key=lambda k: (k[1], k[0], k[3], _size(lat[k]))):
        if len(sets) > 1 and k[1] != last_set:
            lines.append(f"-- {k[1][0]}" + (f" ({k[1][1]})" if k[1][1] else ""))
            last_set = k[1]
        b = best.get(k)
        any_row = next(iter(lat[k].values()))
        label = any_row.get("shape_label", k[2])[:26]
        if b is None:
            line = f"{k[0]:6} {label:26} {k[3]:9} {'(none)':16} {'':>10} {'':>9} {'':>8}"
        else:
            o = other.get((k, b["backend"]), {})
            line = (f"{k[0]:6} {label:26} {k[3]:9} {b['backend']:16} {_fmt_us(b['p50']):>10} "
                    f"{o.get('throughput', 0):9.1f} {_roof_text(o.get('roofline_row')):>8}")
        for p in peers:
            pr = lat[k].get(p)
            if pr is None or b is None:
                line += f" {'-':>14}"
            else:
                line += f" {pr['p50'] / b['p50']:13.2f}x"
        lines.append(line)
    if skipped:
        seen = set()
        lines.append("skipped:")
        for op, impl, why in skipped:
            if (op, impl, why) in seen:
                continue
            seen.add((op, impl, why))
            lines.append(f"  {op}/{impl}: {why}")
    if errors:
        lines.append(f"errors ({len(errors)}):")
        for op, impl, case, msg in list(errors)[:20]:
            lines.append(f"  {op}/{impl} {case}: {msg}")
    if any(roofline.is_suspect(r) for r in rows):
        lines.append("roof% 'suspect': above 100 % of the ceiling even after measuring it again; "
                     "the ceiling, not the kernel, is in question (see the row's ceiling_note)")
    if truncated:
        lines.append("NOTE: the time budget ran out; the sweep is partial")
    return "\n".join(lines)


def _roof_text(r) -> str:
    """% of roofline, or "suspect" for a point above 100 % of its ceiling (the ceiling is wrong)."""
    if r is None:
        return "-"
    return "suspect" if roofline.is_suspect(r) else f"{r['p50']:.1f}"


def _set_of(r: dict) -> tuple:
    """(device slug, source file): rows of one result set."""
    return ((r.get("device") or {}).get("slug") or "?", r.get("_source") or "")


def _size(d: dict) -> int:
    return next(iter(d.values())).get("size", 0)


def main(argv=None) -> int:
    """python -m posattn.bench.summary RESULTS...: the summary table of saved results."""
    import sys

    from posattn.bench import results

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m posattn.bench.summary RESULTS.jsonl|DIR ...", file=sys.stderr)
        return 2
    print(text(results.load(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

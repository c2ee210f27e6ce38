"""One self-contained, offline HTML page from result rows.

For each op and each result set (one device's rows from one file): latency,
throughput and % of roofline against size per backend with p20-p80 bands
(one row of charts per dtype), speed-up heatmaps of the fastest posattn
backend over each peer (shapes x dtypes), and a sortable table of every
measurement. Each result set's device fingerprint heads the page. Charts are
inline SVG (posattn.bench.svg); the only script is a few lines that sort the
tables. Nothing is loaded from the network.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from posattn.bench import results as resmod
from posattn.bench import roofline
from posattn.bench.svg import Axis, HeatCell, Heatmap, Series, color_for, esc, heatmap, human, line_chart

DTYPE_ORDER = {"bfloat16": 0, "float16": 1, "float32": 2, "float64": 3}


@dataclass
class ResultSet:
    sid: str
    source: str
    device: dict
    rows: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.device.get('name', '?')} — {self.source}"

    def first(self, key, default=None):
        for r in self.rows:
            if r.get(key) is not None:
                return r[key]
        return default


def group_sets(rows: list[dict]) -> list[ResultSet]:
    sets: dict = {}
    for r in rows:
        dev = r.get("device") or {}
        k = (r.get("_source", ""), dev.get("slug", "unknown"))
        if k not in sets:
            sets[k] = ResultSet(f"s{len(sets)}", _short(r.get("_source", "")), dev)
        sets[k].rows.append(r)
    return list(sets.values())


def _short(path: str) -> str:
    if not path:
        return "(unsaved)"
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def write(paths, out_dir, title: str = "posattn benchmarks") -> Path:
    """Render the result files/directories ``paths`` into ``out_dir``/index.html."""
    rows = resmod.load(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text(render(rows, title=title), encoding="utf-8")
    return page


# ---------------------------------------------------------------------------

def _fmt_us(v: float) -> str:
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.3g} µs"


def render(rows: list[dict], title: str = "posattn benchmarks") -> str:
    sets = group_sets(rows)
    ops = sorted({r["op"] for r in rows})
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<header><h1>{esc(title)}</h1><p class='meta'>generated {esc(now)} · "
            f"{len(rows)} result rows · {len(sets)} result set(s) · ops: "
            + ", ".join(f"<a href='#op-{esc(o)}'>{esc(o)}</a>" for o in ops) + "</p>",
            _how_to_read(), "</header>"]
    body.append("<section class='sets'><h2>Result sets</h2><div class='cards'>")
    for s in sets:
        body.append(_fingerprint_card(s))
    body.append("</div></section>")
    for op in ops:
        body.append(_op_section(op, sets))
    return (_PAGE.replace("@@TITLE@@", esc(title)).replace("@@CSS@@", _CSS).replace("@@JS@@", _JS)
            .replace("@@BODY@@", "\n".join(body)))


def _how_to_read() -> str:
    return ("<details class='howto'><summary>How to read this page</summary><ul>"
            "<li>Each line is one backend (solid: posattn; dashed: a peer library). The dot is the median "
            "(p50) of repeated runs; the shaded band spans p20–p80.</li>"
            "<li><b>Latency</b>: time per call (lower is better). <b>Throughput</b>: bytes an ideal kernel "
            "moves (read + write) divided by latency. <b>% of roofline</b>: the time the device's peak "
            "bandwidth/FLOP rate allows, over the measured time (100% = at the ceiling). On a known GPU the ceiling "
            "is the datasheet's; elsewhere it is a large copy and a matrix product measured in the same run. A point "
            "above 100% means the ceiling is wrong (measured while the machine was busy), so the run measures it "
            "again and re-derives every point; a point still above 100% is listed as <i>ceiling suspect</i> "
            "under its chart and is not drawn.</li>"
            "<li><b>Heatmaps</b>: speed-up of the fastest posattn backend over a peer, per shape and dtype "
            "(green: posattn faster; red: slower).</li>"
            "<li>The table holds every measurement; click a column header to sort. The <i>command</i> "
            "column reproduces the row.</li></ul></details>")


def _fingerprint_card(s: ResultSet) -> str:
    d = s.device
    peaks = s.first("peaks", {}) or {}
    versions = s.first("versions", {}) or {}
    commits = sorted({r.get("git_commit") or "?" for r in s.rows})
    stamps = sorted({r.get("timestamp") for r in s.rows if r.get("timestamp")})
    modes = sorted({r.get("mode") for r in s.rows if r.get("mode")})
    items = [("device", d.get("name")), ("kind", d.get("kind")), ("slug", d.get("slug"))]
    if d.get("kind") == "cuda":
        items += [("compute capability", d.get("cc")), ("SMs", d.get("sm_count")),
                  ("memory", f"{d.get('memory_gb')} GiB"), ("L2", f"{d.get('l2_mb')} MiB"), ("CUDA", d.get("cuda"))]
    else:
        items += [("cores", d.get("cores")), ("torch threads", d.get("threads")), ("arch", d.get("machine"))]
    items += [("roofline bandwidth", f"{peaks.get('bandwidth_gbs')} GB/s"),
              ("roofline compute", f"{peaks.get('tflops')} TFLOP/s"),
              ("roofline source", peaks.get("source")),
              ("measured copy", f"{peaks.get('measured_copy_gbs')} GB/s"),
              ("ceiling re-measured", (f"{peaks['remeasured']} time(s): a kernel exceeded the first figure"
                                       if peaks.get("remeasured") else None)),
              ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
              ("git commit", ", ".join(commits)), ("sweep", ", ".join(modes)),
              ("measured", (stamps[0] + (" … " + stamps[-1] if len(stamps) > 1 else "")) if stamps else "?"),
              ("rows", len(s.rows))]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v not in (None, "None GB/s"))
    return (f"<div class='card' id='set-{s.sid}'><h3>{esc(d.get('name', '?'))}</h3>"
            f"<p class='src'>{esc(s.source)}</p><dl>{dl}</dl></div>")


def _legend(impls: list[tuple[str, str]]) -> str:
    items = []
    for name, kind in impls:
        dash = ' stroke-dasharray="6 3"' if kind == "peer" else ""
        items.append(f"<span class='lg'><svg width='26' height='10' aria-hidden='true'><line x1='1' y1='5' "
                     f"x2='25' y2='5' stroke='{color_for(name)}' stroke-width='2.5'{dash}/></svg>"
                     f"{esc(name)}<small>{' (peer)' if kind == 'peer' else ''}</small></span>")
    return "<div class='legend'>" + "".join(items) + "</div>"


def _impl_order(rows) -> list[tuple[str, str]]:
    seen = {}
    for r in rows:
        seen.setdefault(r["backend"], r.get("kind", "posattn"))
    order = {"cuda": 0, "triton": 1, "cpu": 2, "reference": 3}
    return sorted(seen.items(), key=lambda kv: (kv[1] == "peer", order.get(kv[0], 9), kv[0]))


def _op_section(op: str, sets: list[ResultSet]) -> str:
    out = [f"<section class='op' id='op-{esc(op)}'>"]
    op_rows = [r for s in sets for r in s.rows if r["op"] == op]
    out.append(f"<h2>{esc(op)}</h2>")
    for s in sets:
        rows = [r for r in s.rows if r["op"] == op]
        if not rows:
            continue
        out.append(_set_block(op, s, rows))
    out.append(_table(op, sets))
    out.append("</section>")
    del op_rows
    return "\n".join(out)


def _series(rows, metric, impls):
    by = defaultdict(list)
    for r in rows:
        if r["metric"] != metric:
            continue
        tip = (f"{r['backend']} · {r.get('shape_label', r.get('shape_key'))} · {r['dtype']}: "
               f"{_val(metric, r['p50'])} (p20 {_val(metric, r['p20'])}, p80 {_val(metric, r['p80'])})")
        by[r["backend"]].append((r["size"], r["p20"], r["p50"], r["p80"], tip))
    return [Series(name, by[name], color_for(name), kind == "peer") for name, kind in impls if by.get(name)]


def _val(metric: str, v: float) -> str:
    if metric == "latency":
        return _fmt_us(v)
    if metric == "throughput":
        return f"{v:.3g} GB/s"
    if metric == "roofline":
        return f"{v:.3g}%"
    if metric == "speedup":
        return f"{v:.2f}x"
    if metric == "tflops":
        return f"{v:.3g} TFLOP/s"
    return f"{v:.3g}"


def _set_block(op: str, s: ResultSet, rows: list[dict]) -> str:
    impls = _impl_order([r for r in rows if r["metric"] == "latency"])
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: (DTYPE_ORDER.get(d, 9), d))
    size_name = next((r.get("size_name") for r in rows if r.get("size_name")), "size")
    out = [f"<div class='set'><h3>{esc(s.device.get('name', '?'))} "
           f"<a class='src' href='#set-{s.sid}'>{esc(s.source)}</a></h3>", _legend(impls)]
    for dt in dtypes:
        drows = [r for r in rows if r["dtype"] == dt]
        cid = f"{op}-{s.sid}-{dt}"
        out.append(f"<h4>{esc(dt)}</h4><div class='charts'>")
        out.append(line_chart(_series(drows, "latency", impls), title=f"latency ({dt})", chart_id=f"lat-{cid}",
                              x=Axis(True, size_name), y=Axis(True, "µs per call (lower is better)")))
        out.append(line_chart(_series(drows, "throughput", impls), title=f"throughput ({dt})",
                              chart_id=f"thr-{cid}", x=Axis(True, size_name), y=Axis(True, "GB/s")))
        # a point above 100 % of its ceiling says the ceiling is wrong: listed, never drawn
        suspect = [r for r in drows if roofline.is_suspect(r)]
        roof = _series([r for r in drows if not roofline.is_suspect(r)], "roofline", impls)
        if roof:  # no roofline without a known or measured ceiling
            hi = max([p[3] for sr in roof for p in sr.points] + [100.0])
            out.append(line_chart(roof, title=f"% of roofline ({dt})", chart_id=f"roof-{cid}",
                                  x=Axis(True, size_name), y=Axis(False, "% of peak", lo=0.0, hi=hi * 1.05)))
        if suspect:
            out.append(_suspect_box(suspect, dt, cid, drawn=bool(roof)))
        out.append("</div>")
    out.append("<div class='heatmaps'>" + _heatmaps(op, s, rows, dtypes) + "</div>")
    notes = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["backend"], r["note"])
    if notes:
        out.append("<details class='notes'><summary>what each line times</summary><ul>"
                   + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in notes.items()) + "</ul></details>")
    out.append("</div>")
    return "\n".join(out)


def _suspect_box(rows: list[dict], dt: str, cid: str, drawn: bool) -> str:
    """What the % of roofline chart leaves out: points above 100 % of their ceiling."""
    items = "".join(
        f"<li><b>{esc(r['backend'])}</b> {esc(r.get('shape_label', r.get('shape_key')))}: "
        f"{esc(r.get('ceiling_note') or roofline.note(r['p50'], r.get('peaks') or {}))}</li>"
        for r in sorted(rows, key=lambda r: (r["backend"], r.get("size", 0))))
    head = ("% of roofline: not drawn" if drawn else f"% of roofline ({esc(dt)}): no point drawn")
    return (f"<div class='suspect' id='suspect-{esc(cid)}'><p><b>{head}</b> — above 100 % of the "
            f"ceiling, so the ceiling, not the kernel, is in question (ceiling suspect):</p><ul>{items}</ul></div>")


def _heatmaps(op: str, s: ResultSet, rows: list[dict], dtypes: list[str]) -> str:
    lat = [r for r in rows if r["metric"] == "latency"]
    peers = sorted({r["backend"] for r in lat if r.get("kind") == "peer"})
    shapes = sorted({(r["size"], r.get("shape_label", r["shape_key"])) for r in lat})
    shape_labels = [lab for _, lab in shapes]
    best: dict = {}
    for r in lat:
        if r.get("kind") != "posattn" or r["backend"] == "reference":
            continue
        k = (r.get("shape_label", r["shape_key"]), r["dtype"])
        if k not in best or r["p50"] < best[k]["p50"]:
            best[k] = r
    if not peers:
        return "<p class='none'>No peer was measured in this result set, so there is no speed-up heatmap.</p>"
    out = []
    for p in peers:
        hm = Heatmap(f"posattn speed-up over {p}", shape_labels, dtypes)
        for r in lat:
            if r["backend"] != p:
                continue
            k = (r.get("shape_label", r["shape_key"]), r["dtype"])
            b = best.get(k)
            if b is None:
                continue
            v = r["p50"] / b["p50"]
            hm.cells[k] = HeatCell(v, f"{v:.2f}x {b['backend']}",
                                   f"{k[0]} {k[1]}: {b['backend']} {_fmt_us(b['p50'])} vs {p} {_fmt_us(r['p50'])}")
        out.append(heatmap(hm, chart_id=f"heat-{op}-{s.sid}-{p}"))
    return "\n".join(out)


_COLUMNS = [("result set", "s"), ("backend", "s"), ("kind", "s"), ("shape", "s"), ("size", "n"), ("dtype", "s"),
            ("p50 µs", "n"), ("p20–p80 µs", "s"), ("GB/s", "n"), ("% roofline", "n"), ("speed-up", "n"),
            ("max abs err", "n"), ("timer", "s"), ("command", "s")]


def _table(op: str, sets: list[ResultSet]) -> str:
    out = [f"<details class='table' open><summary>all {esc(op)} measurements</summary><div class='tablewrap'>"
           f"<table class='sortable' id='table-{esc(op)}'><thead><tr>"]
    for i, (name, typ) in enumerate(_COLUMNS):
        out.append(f"<th data-col='{i}' data-type='{typ}' title='click to sort'>{esc(name)}</th>")
    out.append("</tr></thead><tbody>")
    for s in sets:
        merged = defaultdict(dict)
        for r in s.rows:
            if r["op"] != op:
                continue
            merged[(r["backend"], r["shape_key"], r["dtype"])][r["metric"]] = r
        for (backend, _sk, dtype), m in sorted(merged.items(), key=lambda kv: (kv[0][2], _size(kv[1]), kv[0][0])):
            lat = m.get("latency")
            if lat is None:
                continue
            sp = m.get("speedup")
            set_name = f"{s.device.get('name', '?')} · {s.source}"
            cells = [
                (set_name, set_name),
                (backend, backend), (lat.get("kind", ""), lat.get("kind", "")),
                (lat.get("shape_label", lat["shape_key"]), lat["size"]), (human(lat["size"]), lat["size"]),
                (dtype, dtype), (f"{lat['p50']:.4g}", lat["p50"]),
                (f"{lat['p20']:.4g} – {lat['p80']:.4g}", lat["p20"]),
                _num(m.get("throughput"), "{:.4g}"), _roof_cell(m.get("roofline")),
                ((f"{sp['p50']:.2f}x vs {sp.get('baseline', '?')}", sp["p50"]) if sp else ("", "")),
                _num(m.get("max_abs_err"), "{:.2e}"),
                (f"{lat.get('timer', '')} ×{lat.get('reps', '')}", lat.get("timer", "")),
                (lat.get("command", ""), lat.get("command", "")),
            ]
            tds = []
            for i, (t, v) in enumerate(cells):
                cls = " class='cmd'" if i == len(cells) - 1 else ""
                tds.append(f"<td data-v='{esc(v)}'{cls}>{esc(t)}</td>")
            out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div></details>")
    return "".join(out)


def _num(r, fmt):
    if r is None or r.get("p50") is None or (isinstance(r["p50"], float) and not math.isfinite(r["p50"])):
        return ("", "")
    return (fmt.format(r["p50"]), r["p50"])


def _roof_cell(r):
    text, v = _num(r, "{:.3g}")
    if r is not None and text and roofline.is_suspect(r):
        return (f"{text} (ceiling suspect)", v)
    return (text, v)


def _size(m: dict) -> int:
    return next(iter(m.values())).get("size", 0)


_CSS = """
:root { --fg:#1b1f24; --muted:#57606a; --line:#d0d7de; --bg:#ffffff; --card:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 16px 24px 48px; max-width: 1500px; }
h1 { font-size: 24px; margin: 4px 0; } h2 { font-size: 20px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; margin-top: 28px; } h3 { font-size: 16px; margin: 18px 0 6px; } h4 { margin: 10px 0 2px; }
.meta, .src { color: var(--muted); font-size: 12px; font-weight: normal; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px;
        flex: 1 1 420px; max-width: 720px; }
.card h3 { margin: 2px 0; } .card dl { display: grid; grid-template-columns: max-content 1fr; gap: 1px 10px;
  margin: 6px 0; font-size: 12px; } .card dt { color: var(--muted); } .card dd { margin: 0; word-break: break-word; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; margin: 4px 0 2px; }
.lg svg { vertical-align: middle; margin-right: 4px; } .lg small { color: var(--muted); }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 10px; }
svg.chart { background: #fff; border: 1px solid var(--line); border-radius: 4px; }
svg .title { font-size: 12.5px; font-weight: 600; fill: var(--fg); }
svg .tick { font-size: 10px; fill: var(--muted); } svg .axis { font-size: 11px; fill: var(--muted); }
svg .grid line { stroke: #eaeef2; stroke-width: 1; } svg .frame { fill: none; stroke: var(--line); }
svg .band { opacity: 0.18; stroke: none; } svg path.series { fill: none; stroke-width: 2; }
svg .empty { fill: var(--muted); font-size: 12px; }
svg rect.cell { stroke: #fff; } svg rect.cell.empty { fill: #f3f4f6; }
svg .cellv { font-size: 10.5px; fill: #111; pointer-events: none; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--muted); }
.howto ul, .notes ul { margin: 4px 0; padding-left: 20px; font-size: 13px; }
table.sortable { border-collapse: collapse; font-size: 12px; width: 100%; margin-top: 6px; }
table.sortable th, table.sortable td { border: 1px solid var(--line); padding: 3px 6px; text-align: left;
  white-space: nowrap; }
table.sortable th { background: var(--card); cursor: pointer; user-select: none; position: sticky; top: 0; }
table.sortable th.asc::after { content: " ▲"; } table.sortable th.desc::after { content: " ▼"; }
table.sortable td.cmd { font-family: ui-monospace, monospace; font-size: 11px; }
.tablewrap { overflow-x: auto; max-width: 100%; }
table.sortable tbody tr:nth-child(even) { background: #fafbfc; }
p.none { color: var(--muted); }
.suspect { flex: 1 1 300px; max-width: 440px; border: 1px dashed #bf8700; border-radius: 4px; padding: 4px 10px;
           font-size: 12px; background: #fff8c5; } .suspect p { margin: 4px 0; } .suspect ul { margin: 2px 0;
           padding-left: 18px; }
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th) {
    th.addEventListener('click', function () {
      var col = Number(th.dataset.col), numeric = th.dataset.type === 'n';
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (numeric) {
          var fx = parseFloat(x), fy = parseFloat(y);
          fx = isNaN(fx) ? Infinity : fx; fy = isNaN(fy) ? Infinity : fy;
          return asc ? fx - fy : fy - fx;
        }
        return asc ? x.localeCompare(y) : y.localeCompare(x);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head><body>
@@BODY@@
<script>@@JS@@</script>
</body></html>
"""

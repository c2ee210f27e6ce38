"""A small SVG renderer for the dashboard: line charts with p20-p80 bands on
log or linear axes, and heatmaps. Pure Python, no dependencies; the output
is inline SVG markup (every drawn series is a ``path.series``, every heatmap
cell a ``rect.cell``, so a DOM query can tell that a chart was drawn)."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

POSATTN_COLORS = {"cuda": "#d62728", "triton": "#ff7f0e", "cpu": "#2ca02c", "reference": "#7f7f7f"}
PEER_COLORS = {"transformers": "#1f77b4", "torch.compile": "#9467bd", "liger": "#8c564b",
               "flashinfer": "#e377c2", "flash-attn": "#17becf", "sdpa": "#bcbd22", "flex": "#393b79"}
_EXTRA = ["#6b6ecf", "#b5cf6b", "#e7969c", "#de9ed6", "#637939", "#8ca252", "#843c39", "#7b4173"]


def color_for(name: str) -> str:
    if name in POSATTN_COLORS:
        return POSATTN_COLORS[name]
    if name in PEER_COLORS:
        return PEER_COLORS[name]
    return _EXTRA[sum(map(ord, name)) % len(_EXTRA)]


@dataclass
class Series:
    name: str
    points: list  # [(x, p20, p50, p80, tooltip)]
    color: str = "#333"
    dashed: bool = False


@dataclass
class Axis:
    log: bool = True
    label: str = ""
    lo: float | None = None  # fixed domain ends (None: from data)
    hi: float | None = None
    fmt: object = None  # tick label formatter


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def human(v: float) -> str:
    """1, 16, 1k, 64k, 1M ... for sizes; 3 significant digits otherwise."""
    if v == 0:
        return "0"
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            x = v / div
            return (f"{x:.0f}" if abs(x - round(x)) < 1e-9 or x >= 100 else f"{x:.3g}") + suf
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [10.0 ** k for k in range(k0, k1 + 1) if lo <= 10.0 ** k <= hi]
    if len(ticks) < 3:
        ticks = sorted({m * 10.0 ** k for k in range(k0, k1 + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi})
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    return ticks


def _lin_ticks(lo: float, hi: float) -> list[float]:
    span = hi - lo or 1.0
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=mag * 10)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12 * span:
        out.append(round(v, 12))
        v += step
    return out


class _Scale:
    def __init__(self, lo, hi, a, b, log):
        self.log = log
        if log:
            lo, hi = max(lo, 1e-30), max(hi, 1e-30)
            if hi / lo < 1.0001:
                lo, hi = lo / 2, hi * 2
            self.lo, self.hi = math.log10(lo), math.log10(hi)
        else:
            if hi - lo < 1e-12:
                lo, hi = lo - 1, hi + 1
            self.lo, self.hi = lo, hi
        self.a, self.b = a, b

    def __call__(self, v):
        t = math.log10(max(v, 1e-30)) if self.log else v
        return self.a + (t - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def line_chart(series: list[Series], *, title: str, x: Axis, y: Axis, width: int = 440,
               height: int = 260, chart_id: str = "") -> str:
    """An SVG line chart: one band (p20-p80) and one line (p50) per series."""
    ml, mr, mt, mb = 58, 14, 26, 42
    pts = [p for s in series for p in s.points if _finite(p[1:4], y.log)]
    xs = [p[0] for s in series for p in s.points if p[0] > 0 or not x.log]
    out = [f'<svg class="chart line" id="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
           f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}">',
           f'<text class="title" x="{width / 2:.1f}" y="16" text-anchor="middle">{esc(title)}</text>']
    if not pts or not xs:
        out.append(f'<text class="empty" x="{width / 2:.1f}" y="{height / 2:.1f}" '
                   f'text-anchor="middle">no data</text></svg>')
        return "\n".join(out)
    ylo = y.lo if y.lo is not None else min(p[1] for p in pts)
    yhi = y.hi if y.hi is not None else max(p[3] for p in pts)
    if y.log:
        ylo, yhi = ylo / 1.25, yhi * 1.25
    else:
        pad = (yhi - ylo) * 0.06 or 1.0
        ylo = ylo if y.lo is not None else ylo - pad
        yhi = yhi + pad if y.hi is None else yhi
    xlo, xhi = min(xs), max(xs)
    if x.log:
        xlo, xhi = xlo / 1.3, xhi * 1.3
    sx = _Scale(xlo, xhi, ml, width - mr, x.log)
    sy = _Scale(ylo, yhi, height - mb, mt, y.log)
    # grid, ticks
    xt = _log_ticks(xlo, xhi) if x.log else _lin_ticks(xlo, xhi)
    yt = _log_ticks(ylo, yhi) if y.log else _lin_ticks(ylo, yhi)
    xf = x.fmt or human
    yf = y.fmt or human
    out.append('<g class="grid">')
    for t in xt:
        px = sx(t)
        out.append(f'<line x1="{px:.1f}" y1="{mt}" x2="{px:.1f}" y2="{height - mb}"/>')
        out.append(f'<text class="tick" x="{px:.1f}" y="{height - mb + 14}" text-anchor="middle">{esc(xf(t))}</text>')
    for t in yt:
        py = sy(t)
        out.append(f'<line x1="{ml}" y1="{py:.1f}" x2="{width - mr}" y2="{py:.1f}"/>')
        out.append(f'<text class="tick" x="{ml - 5}" y="{py + 3.5:.1f}" text-anchor="end">{esc(yf(t))}</text>')
    out.append("</g>")
    out.append(f'<rect class="frame" x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}"/>')
    out.append(f'<text class="axis" x="{(ml + width - mr) / 2:.1f}" y="{height - 8}" '
               f'text-anchor="middle">{esc(x.label)}</text>')
    out.append(f'<text class="axis" transform="translate(13,{(mt + height - mb) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{esc(y.label)}</text>')
    out.append(f'<clipPath id="clip-{esc(chart_id)}"><rect x="{ml}" y="{mt}" width="{width - ml - mr}" '
               f'height="{height - mt - mb}"/></clipPath>')
    out.append(f'<g clip-path="url(#clip-{esc(chart_id)})">')
    for s in series:
        p = sorted((q for q in s.points if _finite(q[1:4], y.log) and (q[0] > 0 or not x.log)), key=lambda q: q[0])
        if not p:
            continue
        band = [f"{sx(q[0]):.1f},{sy(q[3]):.1f}" for q in p] + [f"{sx(q[0]):.1f},{sy(q[1]):.1f}" for q in reversed(p)]
        if len(p) > 1:
            out.append(f'<polygon class="band" points="{" ".join(band)}" fill="{s.color}"/>')
        d = "M" + " L".join(f"{sx(q[0]):.1f},{sy(q[2]):.1f}" for q in p)
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        out.append(f'<path class="series" data-name="{esc(s.name)}" d="{d}" stroke="{s.color}"{dash}/>')
        for q in p:
            out.append(f'<circle cx="{sx(q[0]):.1f}" cy="{sy(q[2]):.1f}" r="2.8" fill="{s.color}">'
                       f'<title>{esc(q[4])}</title></circle>')
    out.append("</g></svg>")
    return "\n".join(out)


def _finite(vals, log: bool) -> bool:
    for v in vals:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            return False
    return True


def _heat_color(v: float) -> str:
    """Diverging colour on log2(speed-up): red below 1x, white at 1x, green above (saturates at 8x)."""
    t = max(-1.0, min(1.0, math.log2(v) / 3.0)) if v > 0 else -1.0
    if t >= 0:
        r, g, b = (255 - int(t * 190), 255 - int(t * 80), 255 - int(t * 190))
    else:
        t = -t
        r, g, b = (255 - int(t * 40), 255 - int(t * 190), 255 - int(t * 190))
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass
class HeatCell:
    value: float | None
    label: str = ""
    tooltip: str = ""


@dataclass
class Heatmap:
    title: str
    rows: list  # row labels
    cols: list  # column labels
    cells: dict = field(default_factory=dict)  # (row, col) -> HeatCell


def heatmap(h: Heatmap, chart_id: str = "") -> str:
    cw, ch, ml, mt = 92, 30, 150, 46
    width = ml + cw * max(1, len(h.cols)) + 12
    height = mt + ch * max(1, len(h.rows)) + 12
    out = [f'<svg class="chart heatmap" id="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
           f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{esc(h.title)}">',
           f'<text class="title" x="{width / 2:.1f}" y="16" text-anchor="middle">{esc(h.title)}</text>']
    for j, c in enumerate(h.cols):
        out.append(f'<text class="tick" x="{ml + cw * j + cw / 2:.1f}" y="{mt - 8}" '
                   f'text-anchor="middle">{esc(c)}</text>')
    for i, r in enumerate(h.rows):
        out.append(f'<text class="tick" x="{ml - 6}" y="{mt + ch * i + ch / 2 + 4:.1f}" '
                   f'text-anchor="end">{esc(r)}</text>')
        for j, c in enumerate(h.cols):
            cell = h.cells.get((r, c))
            x0, y0 = ml + cw * j, mt + ch * i
            if cell is None or cell.value is None:
                out.append(f'<rect class="cell empty" x="{x0}" y="{y0}" width="{cw - 2}" height="{ch - 2}"/>')
                continue
            out.append(f'<rect class="cell" x="{x0}" y="{y0}" width="{cw - 2}" height="{ch - 2}" '
                       f'fill="{_heat_color(cell.value)}"><title>{esc(cell.tooltip)}</title></rect>')
            out.append(f'<text class="cellv" x="{x0 + cw / 2 - 1:.1f}" y="{y0 + ch / 2 + 4:.1f}" '
                       f'text-anchor="middle">{esc(cell.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)

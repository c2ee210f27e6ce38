"""A point above 100 % of its ceiling: the run measures a measured ceiling again, re-derives every
roofline row against the better figure, and marks (never draws) what is still above it."""
import json
import re

import pytest
import torch

from posattn.bench import dashboard, device as devmod, registry, results, roofline, runner, summary
from posattn.bench.registry import BenchOp, Shape


def _toy_op():
    """y = 2x, declared as 8000 bytes and 1 FLOP per element (so that a ceiling of 1 GB/s puts
    every point far above 100 %, and one of 1e9 GB/s every point far below)."""
    op = BenchOp(
        name="toy", title="y = 2x",
        make_inputs=lambda shape, dtype, device: {"x": torch.randn(shape.dims["N"], dtype=dtype, device=device)},
        reference=lambda inp: (inp["x"].double() * 2,),
        sweep=lambda mode, dev: [Shape({"N": 64}, 64), Shape({"N": 4096}, 4096)],
        dtypes=lambda mode, dev: [torch.float32],
        bytes=lambda shape, dtype: 8000 * shape.dims["N"], flops=lambda shape, dtype: shape.dims["N"],
        parse_shape=lambda text: Shape({"N": int(text.split("=")[1])}, int(text.split("=")[1])),
        size_name="elements")

    @op.backend("good")
    def _(inp, dev):
        x = inp["x"]
        return lambda: x * 2

    return op


class _Ceiling:
    """Stands in for the copy and matmul measurements: ``copy`` GB/s values in turn (the last repeats)."""

    def __init__(self, *copy):
        self.copy, self.calls = list(copy), 0

    def bandwidth(self, device, nbytes=None, reps=10):
        self.calls += 1
        return self.copy[min(self.calls, len(self.copy)) - 1]

    @staticmethod
    def tflops(device, reps=3):
        return 1e6  # never the binding ceiling here


@pytest.fixture
def toy(monkeypatch):
    registry.ops()  # load the real op modules first, so that they do not land in the patched registry
    monkeypatch.setattr(registry, "_OPS", {"toy": _toy_op()})
    monkeypatch.setattr(registry, "_SKIPPED", {})
    monkeypatch.setattr(devmod, "_measured", {})  # no ceiling left over from another test


def _ceiling(monkeypatch, *copy):
    c = _Ceiling(*copy)
    monkeypatch.setattr(devmod, "measure_copy_bandwidth", c.bandwidth)
    monkeypatch.setattr(devmod, "measure_matmul_tflops", c.tflops)
    return c


def _run(tmp_path, **kw):
    cfg = runner.RunConfig(mode="full", device="cpu", results_path=tmp_path / "results.jsonl", target_s=0.002,
                           **kw)
    return runner.run(cfg, log=lambda m: None)


def _roof(rows):
    return [r for r in rows if r["metric"] == "roofline"]


def test_a_ceiling_measured_too_low_is_measured_again(toy, monkeypatch, tmp_path):
    """The first copy ran while the machine was busy (1 GB/s: every point lands far above
    100 %); the second gives the real figure. Every row of the run, in memory and on disk,
    is then held against the second figure, and nothing is left marked."""
    c = _ceiling(monkeypatch, 1.0, 1e9)
    res = _run(tmp_path)
    assert c.calls == 2 and res.remeasure_rounds == 1
    assert res.peaks["bandwidth_gbs"] == 1e9 and res.peaks["remeasured"] == 1
    on_disk = results.load(tmp_path / "results.jsonl")
    for rows in (res.rows, on_disk):
        roof = _roof(rows)
        assert len(roof) == 2
        for r in roof:
            assert 0 < r["p50"] <= roofline.LIMIT and "ceiling_suspect" not in r, r
            lat = next(x for x in rows if x["metric"] == "latency" and x["shape_key"] == r["shape_key"])
            assert r["p50"] == pytest.approx(100 * 8000 * r["size"] / 1e18 / (lat["p50"] * 1e-6))
        assert all(r["peaks"]["bandwidth_gbs"] == 1e9 for r in rows)


def test_a_point_still_above_is_marked_listed_and_not_drawn(toy, monkeypatch, tmp_path):
    c = _ceiling(monkeypatch, 1.0)  # every measurement too low
    res = _run(tmp_path, remeasure_rounds=2, remeasure_attempts=3)
    assert c.calls == 1 + 2 * 3  # bounded: two rounds of three attempts, then only marked
    rows = results.load(tmp_path / "results.jsonl")
    roof = _roof(rows)
    assert len(roof) == 2
    for r in roof:
        assert r["p50"] > 100 and r["ceiling_suspect"] is True
        assert "re-measuring it 6 times" in r["ceiling_note"] and "suspect" in r["ceiling_note"]
    html = dashboard.render(rows)
    assert 'id="roof-toy-s0-float32"' not in html  # no point of that chart may be drawn
    box = html.split("id='suspect-toy-s0-float32'")[1].split("</div>")[0]
    assert box.count("<li>") == 2 and "ceiling suspect" in box
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("(ceiling suspect)") == 2
    text = summary.text(res.rows)
    assert re.search(r"toy .* good .* suspect", text) and "the ceiling, not the kernel" in text


def test_a_datasheet_ceiling_is_marked_without_measuring(toy, monkeypatch, tmp_path):
    """A known GPU's ceiling comes from its datasheet: nothing to measure again, the row is marked."""
    c = _ceiling(monkeypatch, 1e9)
    sheet = {"bandwidth_gbs": 1.0, "tflops": 1e-9, "ceiling": "datasheet", "source": "datasheet (Toy GPU)"}
    monkeypatch.setattr(devmod, "peaks", lambda fp, device, measure=True: dict(sheet))
    res = _run(tmp_path)
    assert c.calls == 0 and res.remeasure_rounds == 0
    roof = _roof(res.rows)
    assert roof and all(r["ceiling_suspect"] and "datasheet" in r["ceiling_note"] for r in roof)


def test_only_the_points_above_are_left_out():
    """Rows written before the runner marked anything: the dashboard still never draws a point
    above 100 %, and the chart's axis is not stretched to it."""
    def rows(backend, size, pct):
        base = {"op": "rope", "backend": backend, "kind": "posattn", "shape_key": f"S={size}",
                "shape_label": f"S{size}", "size": size, "dtype": "float32",
                "device": {"name": "CPU", "slug": "cpu-x", "kind": "cpu"}}
        return [dict(base, metric="latency", p20=9.0, p50=10.0, p80=11.0),
                dict(base, metric="roofline", p20=pct * 0.9, p50=pct, p80=pct * 1.1)]

    html = dashboard.render(rows("cpu", 16, 40.0) + rows("cpu", 1024, 153.0) + rows("reference", 16, 2.0))
    chart = html.split('id="roof-rope-s0-float32"')[1].split("</svg>")[0]
    assert "153%" not in chart and "40%" in chart and chart.count("<circle") == 2
    ticks = [float(t) for t in re.findall(r'class="tick"[^>]*text-anchor="end">([\d.]+)<', chart)]
    assert max(ticks) <= 100
    box = html.split("id='suspect-rope-s0-float32'")[1].split("</div>")[0]
    assert "S1024" in box and "153 %" in box and "S16" not in box


def test_apply_rederives_every_row_against_one_ceiling():
    old = {"bandwidth_gbs": 10.0, "tflops": 1.0, "ceiling": "measured"}
    new = dict(old, bandwidth_gbs=20.0, remeasured=1)
    roof = {"metric": "roofline", "bytes": 8000, "flops": 0, "p20": 100.0, "p50": 120.0, "p80": 140.0,
            "peaks": old}
    lat = {"metric": "latency", "p20": 1.0, "p50": 1.0, "p80": 1.0, "peaks": old}
    assert roofline.above([roof, lat]) == [roof] and roofline.above([roof], new) == []
    assert roofline.mark([roof, lat], old) == [roof] and roof["ceiling_suspect"] and "ceiling_suspect" not in lat
    roofline.apply([roof, lat], new)
    assert (roof["p20"], roof["p50"], roof["p80"]) == (50.0, 60.0, 70.0)
    assert roof["peaks"] is new and lat["peaks"] is new and lat["p50"] == 1.0
    assert roofline.mark([roof], new) == [] and "ceiling_suspect" not in roof and "ceiling_note" not in roof


def test_remeasure_keeps_the_best_figures(monkeypatch):
    monkeypatch.setattr(devmod, "_measured", {})
    _ceiling(monkeypatch, 5.0, 30.0, 20.0)
    p = {"bandwidth_gbs": 10.0, "tflops": 1.0, "measured_copy_gbs": 10.0, "measured_matmul_tflops": 1.0,
         "ceiling": "measured", "remeasured": 0}
    q = devmod.remeasure(p, "cpu", attempts=3)
    assert q["bandwidth_gbs"] == 30.0 and q["remeasured"] == 3 and p["bandwidth_gbs"] == 10.0
    assert devmod._measured["cpu"]["measured_copy_gbs"] == 30.0
    sheet = {"bandwidth_gbs": 4800.0, "ceiling": "datasheet"}
    assert devmod.remeasure(sheet, "cpu") is sheet
    json.dumps(q)

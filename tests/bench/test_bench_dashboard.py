"""The dashboard page, checked statically (the browser test loads it for real)."""
import json
import re

from posattn.bench import dashboard, results, svg
from tests.bench.conftest import run_cli


def test_page_is_self_contained(bench_run):
    out, _ = bench_run
    html = (out / "index.html").read_text()
    assert html.startswith("<!doctype html>")
    # nothing fetched from anywhere: no external scripts, styles, images, fonts or imports
    assert not re.search(r"<(script|img|iframe|link)[^>]*\b(src|href)=", html, re.I)
    assert "@import" not in html and "url(http" not in html
    # the only URL is the SVG namespace (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_page_has_every_chart_and_table_row(bench_run):
    out, rows = bench_run
    html = (out / "index.html").read_text()
    dtypes = {r["dtype"] for r in rows}
    for dt in dtypes:
        for kind in ("lat", "thr", "roof"):
            assert f'id="{kind}-rope-s0-{dt}"' in html
    assert html.count('class="chart line"') == 3 * len(dtypes)
    assert html.count('class="chart heatmap"') == 1  # one peer (transformers)
    n_lat = sum(1 for r in rows if r["metric"] == "latency")
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == n_lat
    assert "class='sortable'" in html and "addEventListener('click'" in html
    assert rows[0]["device"]["name"] in html and rows[0]["device"]["slug"] in html


def test_result_sets_side_by_side(bench_run, tmp_path):
    """A second file (here: the same rows relabelled as another device, e.g. committed GPU
    results) becomes its own result set with its own fingerprint card and charts."""
    out, rows = bench_run
    other = tmp_path / "results" / "other-device" / "results.jsonl"
    relabelled = [dict(r, device=dict(r["device"], name="Other Device", slug="other-device")) for r in rows]
    results.upsert(other, relabelled)
    assert run_cli(["dashboard", str(out / "results.jsonl"), str(tmp_path / "results"), "-o", str(tmp_path)]) == 0
    html = (tmp_path / "index.html").read_text()
    assert html.count("class='card'") == 2 and "Other Device" in html
    assert 'id="lat-rope-s1-float32"' in html and 'id="lat-rope-s0-float32"' in html


def test_line_chart_draws_bands_lines_and_points():
    s = svg.Series("cpu", [(16, 1.0, 2.0, 3.0, "a"), (256, 2.0, 4.0, 5.0, "b")], "#123456")
    out = svg.line_chart([s], title="t", x=svg.Axis(True, "tokens"), y=svg.Axis(True, "us"), chart_id="c")
    assert out.count('class="series"') == 1 and out.count("<circle") == 2 and 'class="band"' in out
    empty = svg.line_chart([], title="t", x=svg.Axis(), y=svg.Axis(), chart_id="e")
    assert "no data" in empty and 'class="series"' not in empty


def test_log_ticks_and_human_labels():
    assert svg._log_ticks(1, 100000) == [1, 10, 100, 1000, 10000, 100000]
    assert svg._log_ticks(3, 40) == [5, 10, 20]
    assert [svg.human(v) for v in (1, 16, 1024, 65536, 2.5e6)] == ["1", "16", "1.02k", "65.5k", "2.5M"]


def test_heatmap_colours_diverge_at_one():
    assert svg._heat_color(1.0) == "#ffffff"
    fast, slow = svg._heat_color(4.0), svg._heat_color(0.25)
    assert int(fast[3:5], 16) > int(fast[1:3], 16)  # greener
    assert int(slow[1:3], 16) > int(slow[3:5], 16)  # redder


def test_render_escapes_text():
    row = {"op": "rope", "backend": "<b>x</b>", "kind": "peer", "shape_key": "S=1", "shape_label": "S1",
           "size": 1, "dtype": "float32", "metric": "latency", "p20": 1.0, "p50": 1.0, "p80": 1.0,
           "device": {"name": "<script>alert(1)</script>", "slug": "x", "kind": "cpu"}}
    html = dashboard.render([row])
    assert "<script>alert(1)" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    json.dumps(row)  # rows stay JSON-serialisable

"""The dashboard in a real headless browser (Debian's chromium): no console errors,
every chart drawn, a screenshot saved. Under CI=true a missing chromium fails."""
import os
from pathlib import Path

import pytest

from posattn.bench import browser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium():
    exe = browser.find_chromium()
    if exe is None:
        msg = "chromium is not installed (make test installs Debian's chromium when run as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true needs it")
        pytest.skip(msg)
    return exe


def test_dashboard_loads_clean_and_draws_every_chart(bench_run, chromium):
    out, _ = bench_run
    shot = REPO / "bench-out" / "test-dashboard.png"
    report = browser.check_page(out / "index.html", screenshot=shot, chromium=chromium)
    assert report.errors == []
    assert report.title == "posattn benchmarks"
    assert len(report.charts) >= 7 and report.undrawn == [], report.charts
    assert report.ok
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_broken_page_is_caught(tmp_path, chromium):
    page = tmp_path / "broken.html"
    page.write_text("""<!doctype html><html><head><title>broken</title></head><body>
<svg class="chart line" id="drawn" width="100" height="50"><path class="series" d="M0,0 L10,10"/>
<circle cx="1" cy="1" r="1"/></svg>
<svg class="chart line" id="blank" width="100" height="50"></svg>
<script>console.error("deliberate console error"); undefinedFunctionCall();</script>
</body></html>""")
    report = browser.check_page(page, chromium=chromium)
    assert not report.ok
    assert report.undrawn == ["blank"] and report.charts_drawn == 1
    assert any("deliberate console error" in e for e in report.errors), report.errors
    assert any("undefinedFunctionCall" in e for e in report.errors), report.errors

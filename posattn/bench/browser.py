"""Load a page in headless chromium and report what a person would see go wrong.

:func:`check_page` starts chromium with a fresh profile and remote debugging,
talks to it over the DevTools protocol (through the ``websocket-client``
package), loads the page, and collects

- console errors: uncaught exceptions (``Runtime.exceptionThrown``),
  ``console.error``/``console.assert`` calls, and browser log entries of level
  error (failed loads, blocked resources);
- for every ``svg.chart``: whether it was drawn (a line chart has a
  ``path.series`` with a path and its points; a heatmap has filled cells) and
  its laid-out size;
- optionally a PNG screenshot of the page (or its top ``clip_height`` pixels).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-dev-shm-usage", "--remote-allow-origins=*", "--remote-debugging-port=0"]

_CHART_PROBE = r"""
(() => Array.from(document.querySelectorAll('svg.chart')).map(svg => {
  const paths = Array.from(svg.querySelectorAll('path.series'))
    .filter(p => (p.getAttribute('d') || '').trim().length > 1);
  const cells = svg.querySelectorAll('rect.cell:not(.empty)').length;
  const bb = svg.getBoundingClientRect();
  return {id: svg.id, kind: svg.classList.contains('heatmap') ? 'heatmap' : 'line',
          paths: paths.length, points: svg.querySelectorAll('circle').length, cells: cells,
          width: bb.width, height: bb.height};
}))()
"""


@dataclass
class PageReport:
    errors: list = field(default_factory=list)
    charts: list = field(default_factory=list)  # one dict per svg.chart (see _CHART_PROBE)
    screenshot: Path | None = None
    title: str = ""

    @property
    def charts_drawn(self) -> int:
        return sum(1 for c in self.charts if chart_drawn(c))

    @property
    def undrawn(self) -> list:
        return [c.get("id") for c in self.charts if not chart_drawn(c)]

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.charts) and not self.undrawn


def chart_drawn(c: dict) -> bool:
    if c.get("width", 0) <= 0 or c.get("height", 0) <= 0:
        return False
    if c.get("kind") == "heatmap":
        return c.get("cells", 0) > 0
    return c.get("paths", 0) > 0 and c.get("points", 0) > 0


def find_chromium() -> str | None:
    """Path of a chromium/chrome executable: $POSATTN_CHROMIUM, Debian's chromium, or one on PATH."""
    env = os.environ.get("POSATTN_CHROMIUM")
    if env:
        return env if os.path.exists(env) or shutil.which(env) else None
    # Debian's /usr/bin/chromium is a shell wrapper; its binary takes the same flags
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class _Cdp:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        end = time.monotonic() + timeout
        while True:
            msg = self._recv(end)
            if msg is None:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> dict | None:
        for e in self.events:
            if e["method"] == method:
                return e
        end = time.monotonic() + timeout
        while True:
            msg = self._recv(end)
            if msg is None:
                return None
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            msg = self._recv(end)
            if msg is None:
                return
            if "method" in msg:
                self.events.append(msg)

    def _recv(self, end: float):
        import websocket

        left = end - time.monotonic()
        if left <= 0:
            return None
        self.ws.settimeout(left)
        try:
            return json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return None


def _errors_from(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            desc = (d.get("exception") or {}).get("description") or d.get("text", "exception")
            out.append(f"uncaught: {desc.splitlines()[0]} (line {d.get('lineNumber')})")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            out.append(f"console.{p['type']}: {args}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            ent = p["entry"]
            out.append(f"log: {ent.get('text')} {ent.get('url', '')}".strip())
    return out


def check_page(page, *, screenshot=None, chromium: str | None = None, width: int = 1400,
               clip_height: int | None = None, timeout: float = 60.0) -> PageReport:
    """Load ``page`` (a path or URL) in headless chromium; see the module docstring."""
    import websocket

    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found (install Debian's `chromium`, or set POSATTN_CHROMIUM)")
    url = page if str(page).startswith(("file:", "http:", "https:", "data:", "about:")) \
        else Path(page).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="posattn-chromium-")
    log_path = os.path.join(profile, "chromium.log")
    proc = None
    try:
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000",
                                     "about:blank"], stdout=logf, stderr=subprocess.STDOUT)
        port = _wait_port(profile, proc, timeout, log_path)
        ws_url = _page_target(port, timeout)
        ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        try:
            cdp = _Cdp(ws)
            for m in ("Runtime.enable", "Log.enable", "Page.enable"):
                cdp.call(m)
            cdp.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
            cdp.events.clear()
            nav = cdp.call("Page.navigate", {"url": url}, timeout=timeout)
            if nav.get("errorText"):
                raise RuntimeError(f"chromium could not load {url}: {nav['errorText']}")
            if cdp.wait_event("Page.loadEventFired", timeout) is None:
                raise TimeoutError(f"{url} did not finish loading within {timeout} s")
            cdp.drain(0.5)  # errors thrown by late handlers
            report = PageReport()
            probe = cdp.call("Runtime.evaluate", {"expression": _CHART_PROBE, "returnByValue": True})
            report.charts = probe.get("result", {}).get("value") or []
            t = cdp.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True})
            report.title = t.get("result", {}).get("value") or ""
            if screenshot is not None:
                metrics = cdp.call("Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
                h = int(size.get("height", 1000))
                if clip_height:
                    h = min(h, clip_height)
                shot = cdp.call("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}}, timeout=timeout)
                screenshot = Path(screenshot)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                report.screenshot = screenshot
            cdp.drain(0.2)
            report.errors = _errors_from(cdp.events)
            try:
                cdp.call("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - the browser may close the socket first
                pass
            return report
        finally:
            ws.close()
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _wait_port(profile: str, proc, timeout: float, log_path: str) -> int:
    f = os.path.join(profile, "DevToolsActivePort")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {_tail(log_path)}")
        try:
            with open(f) as fh:
                first = fh.readline().strip()
            if first:
                return int(first)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open its debugging port within {timeout} s: {_tail(log_path)}")


def _page_target(port: int, timeout: float) -> str:
    end = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        for t in targets:
            if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                return t["webSocketDebuggerUrl"]
        if time.monotonic() > end:
            raise RuntimeError("chromium has no page target")
        time.sleep(0.1)


def _tail(path: str, n: int = 800) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""

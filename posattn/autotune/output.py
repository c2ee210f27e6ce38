"""``posattn tune``'s output: the progress bar and the results table."""
from __future__ import annotations

import sys


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def advance(self, n):
        pass


class _Bar:
    def __init__(self, total, label):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]tuning[/bold] " + label), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=False)
        self._t = self._p.add_task("tune", total=total)

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *a):
        return self._p.__exit__(*a)

    def advance(self, n):
        if n:
            self._p.advance(self._t, n)


def progress(show: bool, total: int, devices):
    return _Bar(total, ",".join(devices)) if show and total else _NoBar()


def fmt_config(c) -> str:
    return "" if not c else " ".join(f"{k}={v}" for k, v in c.items())


def print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    from posattn.autotune import cache as C

    t = Table(title=f"posattn tune  (results in {C.write_dir()})")
    for col in ("device", "op", "key", "backend", "chosen config", "time (us)", "default (us)", "speed-up", "notes"):
        t.add_column(col, justify="right" if col in ("time (us)", "default (us)", "speed-up") else "left")
    for r in rows:
        if r["status"] == "skipped":
            continue
        notes = []
        if r["chosen"]:
            notes.append("fastest backend")
        if r["measured"] == 0 and r["status"] == "ok":
            notes.append("cached")
        if r["failed"]:
            notes.append(f"{r['failed']} failed")
        if r["note"]:
            notes.append(r["note"])
        t.add_row(r["device"], r["op"], r["key"], r["backend"], fmt_config(r["config"]),
                  f"{r['time_us']:.1f}" if r["time_us"] else "-",
                  f"{r['default_us']:.1f}" if r["default_us"] else "-",
                  f"{r['speedup']:.2f}x" if r["speedup"] else "-", ", ".join(notes))
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    skipped = sorted({(r["backend"], r["note"]) for r in rows if r["status"] == "skipped"})
    for b, why in skipped:
        print(f"  not tuned: {b} ({why})")

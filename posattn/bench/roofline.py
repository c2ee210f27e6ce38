"""% of roofline, and what a point above 100 % of its ceiling means.

``pct(t, nbytes, nflops, peaks)``: the time the ceiling allows for the op's
bytes and FLOPs (the slower of the two), over the measured time ``t``.

A point above 100 % says the ceiling is wrong, never that the kernel beat
the machine: a CPU ceiling is a copy measured in the same run, and a copy
measured while the machine was busy is too low. The runner therefore
re-measures such a ceiling (:func:`posattn.bench.device.remeasure`) and
re-derives every roofline row of the run against the new figure; a row that
is still above 100 % afterwards (or above a datasheet ceiling, which cannot
be re-measured) is marked ``ceiling_suspect`` with a ``ceiling_note``, and
the dashboard lists it instead of drawing it.
"""
from __future__ import annotations

LIMIT = 100.0  # % of the ceiling that a correct ceiling admits


def bound_seconds(nbytes: int, nflops: int, peaks: dict) -> float | None:
    """Seconds the ceiling allows for ``nbytes`` moved and ``nflops`` done, or None without a ceiling."""
    bw, tf = (peaks or {}).get("bandwidth_gbs"), (peaks or {}).get("tflops")
    if not bw:
        return None
    bound = nbytes / (bw * 1e9)
    if nflops and tf:
        bound = max(bound, nflops / (tf * 1e12))
    return bound


def pct(t: float, nbytes: int, nflops: int, peaks: dict) -> float | None:
    """% of roofline of a call that took ``t`` seconds (None without a ceiling)."""
    bound = bound_seconds(nbytes, nflops, peaks)
    return None if bound is None else 100.0 * bound / t


def is_suspect(row: dict) -> bool:
    """A roofline row that must not be drawn as a fact: marked by the runner, or (rows written
    before the runner marked them) simply above 100 % of its ceiling."""
    if row.get("metric") != "roofline":
        return False
    p50 = row.get("p50")
    return bool(row.get("ceiling_suspect")) or (p50 is not None and p50 > LIMIT)


def rescaled(row: dict, peaks: dict) -> dict:
    """{p20, p50, p80} of a roofline row held against ``peaks`` instead of ``row["peaks"]``."""
    old = bound_seconds(row.get("bytes") or 0, row.get("flops") or 0, row.get("peaks") or {})
    new = bound_seconds(row.get("bytes") or 0, row.get("flops") or 0, peaks)
    if not old or not new:
        return {k: row[k] for k in ("p20", "p50", "p80")}
    f = new / old
    return {k: row[k] * f for k in ("p20", "p50", "p80")}


def above(rows: list[dict], peaks: dict | None = None) -> list[dict]:
    """The roofline rows whose median is above 100 % (against ``peaks`` when given)."""
    out = []
    for r in rows:
        if r.get("metric") != "roofline":
            continue
        p50 = rescaled(r, peaks)["p50"] if peaks is not None else r["p50"]
        if p50 > LIMIT:
            out.append(r)
    return out


def apply(rows: list[dict], peaks: dict) -> None:
    """Hold every row against ``peaks`` (in place): roofline rows are re-derived, every row
    records the ceiling it was held against."""
    for r in rows:
        if r.get("metric") == "roofline":
            r.update(rescaled(r, peaks))
        if "peaks" in r:
            r["peaks"] = peaks


def mark(rows: list[dict], peaks: dict) -> list[dict]:
    """Mark (in place) the roofline rows above 100 % as ``ceiling_suspect`` with a note saying
    why; clear the mark from rows that are no longer above. Returns the marked rows."""
    marked = []
    for r in rows:
        if r.get("metric") != "roofline":
            continue
        if r["p50"] > LIMIT:
            r["ceiling_suspect"] = True
            r["ceiling_note"] = note(r["p50"], peaks)
            marked.append(r)
        else:
            r.pop("ceiling_suspect", None)
            r.pop("ceiling_note", None)
    return marked


def note(p50: float, peaks: dict) -> str:
    if (peaks or {}).get("ceiling") == "datasheet":
        return (f"{p50:.0f} % of the datasheet ceiling: the op's byte/FLOP count or a cache that "
                f"held the data is suspect, not drawn as a fact")
    n = int((peaks or {}).get("remeasured") or 0)
    again = f"even after re-measuring it {n} time{'s' if n != 1 else ''}" if n else "(not re-measured)"
    return (f"{p50:.0f} % of a ceiling measured in this run {again}: the ceiling is suspect "
            f"(measured while the machine was busy), not drawn as a fact")

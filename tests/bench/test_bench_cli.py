"""`posattn bench` on this CPU: real rows for rope, accuracy against the fp64 reference, reproducible commands."""
import json
import shlex

import pytest

from tests.bench.conftest import run_cli
from tests._tol import tol

import torch


def _rows(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def test_rows_cover_metrics_and_backends(bench_run):
    out, rows = bench_run
    assert {r["backend"] for r in rows} == {"cpu", "reference", "transformers"}
    assert {r["metric"] for r in rows} == {"latency", "throughput", "tflops", "roofline", "max_abs_err", "speedup"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in _rows(rows, metric="latency"):
        assert 0 < r["p20"] <= r["p50"] <= r["p80"] and r["unit"] == "us"
        assert r["device"]["kind"] == "cpu" and r["timer"] == "perf_counter" and r["cold_l2"] is True
        assert r["peaks"]["bandwidth_gbs"] > 0 and r["versions"]["torch"]
    for r in _rows(rows, metric="speedup"):
        assert r["baseline"] == "transformers" and r["backend"] != "transformers"
    assert (out / "index.html").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_posattn_accuracy_is_recorded_within_tolerance(bench_run, dtype):
    _, rows = bench_run
    t = tol(getattr(torch, dtype))
    for r in _rows(rows, metric="max_abs_err", dtype=dtype):
        if r["backend"] in ("cpu", "reference"):
            # |randn| stays well under 6 at these sizes
            assert r["p50"] <= t["atol"] + t["rtol"] * 6, r


def test_command_reproduces_the_row(bench_run, tmp_path):
    out, rows = bench_run
    row = _rows(rows, metric="latency", backend="cpu", dtype="float32")[0]
    argv = shlex.split(row["command"])
    assert argv[:2] == ["posattn", "bench"] and argv[-2:] == ["--device", "cpu"]
    results = tmp_path / "again.jsonl"
    assert run_cli(argv[1:] + ["-o", str(tmp_path), "--results", str(results), "--target-s", "0.005"]) == 0
    again = [json.loads(x) for x in results.read_text().splitlines()]
    keys = {(r["backend"], r["shape_key"], r["dtype"], r["metric"]) for r in again}
    assert ("cpu", row["shape_key"], "float32", "latency") in keys
    n = len(again)
    # same command again: rows are upserted, not duplicated
    assert run_cli(argv[1:] + ["-o", str(tmp_path), "--results", str(results), "--target-s", "0.005",
                               "--no-dashboard"]) == 0
    assert len(results.read_text().splitlines()) == n


@pytest.mark.parametrize("argv,msg", [
    (["bench", "--op", "nope"], "--op 'nope'"),
    (["bench", "--op", "rope", "--backend", "warp-drive"], "--backend warp-drive"),
    (["bench", "--op", "rope", "--dtype", "floaty"], "--dtype 'floaty'"),
    (["bench", "--op", "rope", "--shape", "S=x"], "--shape"),
    (["dashboard", "/nonexistent/results.jsonl"], "does not exist"),
    (["bench", "--device", "tpu"], "--device must be cpu or cuda"),
])
def test_bad_arguments_name_the_argument(argv, msg, capsys, tmp_path):
    assert run_cli(argv + ["-o", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err

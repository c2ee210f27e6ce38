"""Shared fixtures for the benchmark-harness tests: one small real run of
`posattn bench` (CPU, rope, two tiny shapes), reused by the dashboard and
browser tests."""
import json
from pathlib import Path

import pytest

TINY_SHAPES = ["B=1,S=8,Hq=4,Hk=2,D=64", "B=1,S=64,Hq=4,Hk=2,D=64"]


def run_cli(argv) -> int:
    from posattn.cli import main

    return main(argv)


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory):
    """(out_dir, rows) of a real `posattn bench` run on this machine's CPU."""
    out = tmp_path_factory.mktemp("bench-run")
    argv = ["bench", "--device", "cpu", "--op", "rope", "--backend", "cpu,reference,transformers",
            "--dtype", "float32,bfloat16", "-o", str(out), "--target-s", "0.005"]
    for s in TINY_SHAPES:
        argv += ["--shape", s]
    assert run_cli(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return Path(out), rows

"""benchmarks/vq_recall.py at a tiny size: query-aware VQ beats plain k-means at equal code count on
synthetic anisotropic data (queries in a low-dimensional subspace); the recorded-model case runs."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vq_recall.py"


def _load():
    spec = importlib.util.spec_from_file_location("vq_recall", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_query_aware_beats_plain_kmeans_synthetic():
    mod = _load()
    res = []
    for seed in (0, 1):
        keys, q = mod.synthetic(2048, 2, 4, 32, 4, 256, seed)
        r = mod.measure(keys, q, 32, 32, iters=8, seed=seed)
        res.append(r)
        # measured at this size: 0.28 vs 0.11 (seed 0), 0.32 vs 0.15 (seed 1); asserted with a margin
        assert r["vq_query_aware"] > 1.5 * r["kmeans"], r
        assert 0.0 <= r["quest"] <= 1.0 and r["quest_page"] >= 1


def test_script_runs_with_the_recorded_model(capsys):
    pytest.importorskip("transformers")
    mod = _load()
    res = mod.main(["--tokens", "1024", "--codes", "16", "--k", "16", "--dim", "32", "--rank", "4", "--queries",
                    "128", "--model-tokens", "512", "--iters", "4"])
    out = capsys.readouterr().out
    assert "synthetic" in out and "model" in out
    for r in res.values():
        for m in ("vq_query_aware", "kmeans", "quest"):
            assert 0.0 <= r[m] <= 1.0

"""Long-format rows: upsert on the unique key, loading files and folders."""
import json

import pytest

from posattn.bench import results


def _row(backend="cpu", p50=1.0, slug="cpu-x", metric="latency", shape="S=1"):
    return {"op": "rope", "backend": backend, "shape_key": shape, "dtype": "float32", "metric": metric,
            "p20": p50, "p50": p50, "p80": p50, "device": {"slug": slug}}


def test_upsert_replaces_same_key_and_appends_new(tmp_path):
    f = tmp_path / "sub" / "r.jsonl"
    assert results.upsert(f, [_row("cpu", 1.0), _row("reference", 2.0)]) == 2
    assert results.upsert(f, [_row("cpu", 3.0), _row("transformers", 4.0)]) == 3
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert [(r["backend"], r["p50"]) for r in rows] == [("cpu", 3.0), ("reference", 2.0), ("transformers", 4.0)]
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("content", [
    '{"op": "rope", "backend": "cpu", "tokens": 1, "median_s": 3e-05}\n',   # an older row format
    '{"op": "rope", "metric": "latency"}\n{"op": "rope", "metr',             # a torn last line
    "not json at all\n",
])
def test_upsert_sets_aside_a_file_that_is_not_result_rows(tmp_path, content):
    f = tmp_path / "results.jsonl"
    f.write_text(content)
    with pytest.warns(UserWarning, match="set that file aside as results.jsonl.bad-"):
        assert results.upsert(f, [_row("cpu"), _row("reference")]) == 2
    (aside,) = tmp_path.glob("results.jsonl.bad-*")
    assert aside.read_text() == content  # kept byte for byte, never deleted
    assert [r["backend"] for r in results.load([f])] == ["cpu", "reference"]


def test_key_separates_devices_metrics_and_shapes(tmp_path):
    f = tmp_path / "r.jsonl"
    results.upsert(f, [_row(slug="a"), _row(slug="b"), _row(metric="throughput"), _row(shape="S=2")])
    assert len(f.read_text().splitlines()) == 4


def test_upsert_drops_private_fields(tmp_path):
    f = tmp_path / "r.jsonl"
    r = _row()
    r["_source"] = "x"
    results.upsert(f, [r])
    assert "_source" not in json.loads(f.read_text())


def test_load_files_and_folders(tmp_path):
    results.upsert(tmp_path / "a" / "results.jsonl", [_row("cpu")])
    results.upsert(tmp_path / "b" / "results-two.jsonl", [_row("reference"), _row("transformers")])
    # other JSON lines in a results folder (a script's raw output) are not result rows: left alone
    (tmp_path / "b" / "raw_sweep.jsonl").write_text('{"bench": "something else"}\n')
    rows = results.load([tmp_path])
    assert sorted(r["backend"] for r in rows) == ["cpu", "reference", "transformers"]
    assert all(r["_source"].endswith(".jsonl") for r in rows)
    # named explicitly, a file must hold result rows
    with pytest.raises(ValueError, match="not a posattn result row"):
        results.load([tmp_path / "b" / "raw_sweep.jsonl"])


def test_load_reports_bad_lines(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(_row()) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        results.load(f)
    g = tmp_path / "other.jsonl"
    g.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a posattn result row"):
        results.load(g)
    with pytest.raises(ValueError, match="does not exist"):
        results.load(tmp_path / "missing.jsonl")


def test_versions_and_commit():
    v = results.versions()
    assert "torch" in v and "python" in v and "posattn" in v
    c = results.git_commit()
    assert c is None or len(c.split("-")[0]) >= 7

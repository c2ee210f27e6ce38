"""The cache file: schema, set-aside of bad files, merges, lookup order, nearest bucket, versions."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import posattn
from posattn import autotune, dispatch
from posattn.autotune import cache as C

from ._util import TKey, cpu_file, entry, header, register_tunetest, rope_key, unregister_tunetest


def _doc(entries):
    d = C.new_doc("fp", {}, {})
    d["entries"] = entries
    return d


def test_validate_accepts_a_written_file(dirs):
    path = cpu_file(dirs.tune)
    C.write_entries(path, header(), [entry("rope", "cpu", rope_key(), [({"threads": 1, "chunk": 16}, 1e-4)])])
    doc = json.loads(path.read_text())
    C.validate(doc)
    assert doc["header"]["fingerprint"] == header()["fingerprint"]


@pytest.mark.parametrize("mutate, what", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(schema_version=2), "foreign version"),
    (lambda d: d.update(entries={}), "entries"),
    (lambda d: d["entries"][0].update(version="1"), "version"),
    (lambda d: d["entries"][0]["key"].update(tokens_bucket=24), "power of two"),
    (lambda d: d["entries"][0]["results"][0].update(status="great"), "status"),
    (lambda d: d["entries"][0]["results"][0].update(time_s=-1.0), "positive time"),
    (lambda d: d["entries"][0]["results"][0]["config"].update(threads={"__import__": "os"}), "scalar"),
    (lambda d: d["entries"][0]["results"][0]["config"].update(threads=[1, 2]), "scalar"),
])
def test_validate_rejects(mutate, what):
    d = _doc([entry("rope", "cpu", rope_key(), [({"threads": 1}, 1e-4)])])
    C.validate(d)
    mutate(d)
    with pytest.raises(C.SchemaError, match=what):
        C.validate(d)


def _good_bytes():
    d = _doc([entry("rope", "cpu", rope_key(), [({"threads": 1, "chunk": 16}, 1e-4)])])
    return json.dumps(d).encode()


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage",                                   # corrupt
    _good_bytes()[: len(_good_bytes()) // 2],              # truncated
    json.dumps({**json.loads(_good_bytes()), "schema_version": 99}).encode(),  # foreign version
    b"",                                                   # empty
])
def test_bad_file_is_set_aside_and_the_op_still_runs(dirs, content, caplog):
    path = cpu_file(dirs.tune)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    q = torch.randn(1, 7, 3, 16)
    spec = posattn.RopeSpec(16)
    with caplog.at_level(logging.WARNING, logger="posattn.autotune"):
        out, _ = posattn.apply_rope(q, None, torch.arange(7), spec, backend="cpu")
    ref, _ = posattn.apply_rope(q, None, torch.arange(7), spec, backend="reference")
    torch.testing.assert_close(out, ref)
    assert not path.exists()
    aside = list(dirs.tune.glob(path.name + ".bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content  # renamed, never deleted
    assert any("set aside" in r.getMessage() for r in caplog.records)


def test_bad_shipped_file_is_ignored_not_moved(dirs):
    dirs.shipped.mkdir()
    from posattn.autotune import fingerprint as F

    p = dirs.shipped / f"{F.cpu_device().slug}.json"
    p.write_text("{not json")
    k, cfg = dispatch.select("rope", rope_key(), backend="cpu")
    assert cfg == {"threads": 0, "chunk": 16}
    assert p.exists()


def test_merge_keeps_both_writers_and_newer_results(dirs):
    path = dirs.tune / "x.json"
    C.write_entries(path, header(), [entry("tunetest", "cpu", TKey(n_bucket=1), [({"work": 1}, 2e-3)])])
    C.write_entries(path, header(), [entry("tunetest", "cpu", TKey(n_bucket=2), [({"work": 1}, 2e-3)])])
    C.write_entries(path, header(), [entry("tunetest", "cpu", TKey(n_bucket=1), [({"work": 2}, 1e-3)])])
    doc = C.read_file(path, writable=True)
    assert len(doc["entries"]) == 2
    e1 = next(e for e in doc["entries"] if e["key"]["n_bucket"] == 1)
    assert sorted(r["config"]["work"] for r in e1["results"]) == [1, 2]
    assert C.best_result(e1)["config"] == {"work": 2}


def _write_layers(dirs, key, tune=None, user=None, shipped=None):
    from posattn.autotune import fingerprint as F

    for d, cfg, name in ((dirs.tune, tune, F.cpu_device().fingerprint), (dirs.user, user, F.cpu_device().fingerprint),
                         (dirs.shipped, shipped, F.cpu_device().slug)):
        if cfg is not None:
            C.write_entries(d / f"{name}.json", header(), [entry("rope", "cpu", key, [(cfg, 1e-4)])])
    autotune.reload()


def test_fallback_order(dirs, caplog):
    k = rope_key(tokens_bucket=16)
    a, b, c = ({"threads": 1, "chunk": 4}, {"threads": 1, "chunk": 16}, {"threads": 1, "chunk": 64})
    _write_layers(dirs, k, tune=a, user=b, shipped=c)
    assert dispatch.select("rope", k, backend="cpu")[1] == a
    cpu_file(dirs.tune).unlink()
    autotune.reload()
    assert dispatch.select("rope", k, backend="cpu")[1] == b
    cpu_file(dirs.user).unlink()
    autotune.reload()
    with caplog.at_level(logging.INFO, logger="posattn.autotune"):
        assert dispatch.select("rope", k, backend="cpu")[1] == c
        assert dispatch.select("rope", rope_key(tokens_bucket=32), backend="cpu")[1] == c  # nearest, shipped
    assert sum("shipped configs" in r.getMessage() for r in caplog.records) == 1  # once, not per key
    for p in dirs.shipped.glob("*.json"):
        p.unlink()
    autotune.reload()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="posattn.autotune"):
        assert dispatch.select("rope", k, backend="cpu")[1] == {"threads": 0, "chunk": 16}  # heuristic default
        dispatch.select("rope", rope_key(tokens_bucket=64), backend="cpu")
        for _ in range(3):
            posattn.apply_rope(torch.randn(1, 5, 3, 16), None, torch.arange(5), posattn.RopeSpec(16), backend="cpu")
    assert sum("heuristic defaults" in r.getMessage() for r in caplog.records) == 1


def test_nearest_bucket(dirs):
    small, big = {"threads": 1, "chunk": 4}, {"threads": 2, "chunk": 64}
    path = cpu_file(dirs.tune)
    C.write_entries(path, header(), [entry("rope", "cpu", rope_key(tokens_bucket=16), [(small, 1e-5)]),
                                     entry("rope", "cpu", rope_key(tokens_bucket=1024), [(big, 1e-3)])])
    autotune.reload()
    pick = lambda t: dispatch.select("rope", rope_key(tokens_bucket=t), backend="cpu")[1]  # noqa: E731
    assert pick(16) == small and pick(32) == small and pick(64) == small
    assert pick(256) == big and pick(512) == big and pick(65536) == big
    assert pick(1) == small
    # another shape (head count) is not served by these entries
    assert dispatch.select("rope", rope_key(tokens_bucket=16, heads_q=5), backend="cpu")[1] == {"threads": 0, "chunk": 16}
    # an exact key in a later layer beats a nearest bucket in an earlier one
    from posattn.autotune import fingerprint as F

    exact = {"threads": 2, "chunk": 16}
    C.write_entries(dirs.user / f"{F.cpu_device().fingerprint}.json", header(),
                    [entry("rope", "cpu", rope_key(tokens_bucket=32), [(exact, 1e-5)])])
    autotune.reload()
    assert pick(32) == exact


def test_changed_kernel_version_ignores_stale_entries(dirs):
    try:
        register_tunetest([{"work": 1}], {"work": 3}, version=1)
        k = TKey(n_bucket=64)
        C.write_entries(cpu_file(dirs.tune), header(), [entry("tunetest", "cpu", k, [({"work": 1}, 1e-5)], version=1)])
        autotune.reload()
        assert dispatch.select("tunetest", k)[1] == {"work": 1}
        register_tunetest([{"work": 1}], {"work": 3}, version=2)  # the kernel changed
        autotune.reload()
        assert dispatch.select("tunetest", k)[1] == {"work": 3}
        assert dispatch.select("tunetest", TKey(n_bucket=128))[1] == {"work": 3}  # no stale nearest either
    finally:
        unregister_tunetest()


def test_unknown_config_names_are_not_passed_to_kernels(dirs):
    k = rope_key()
    C.write_entries(cpu_file(dirs.tune), header(), [entry("rope", "cpu", k, [({"threads": 1, "evil": "rm -rf"}, 1e-6)])])
    autotune.reload()
    assert dispatch.select("rope", k, backend="cpu")[1] == {"threads": 0, "chunk": 16}


def test_tuned_backend_choice(dirs):
    """The cache may pick a backend: the fastest current-version one for the key (nearest bucket too)."""
    try:
        register_tunetest([{"work": 1}], {"work": 1})
        dispatch.register("tunetest", "reference", default_config=lambda key: {"work": 1})(
            __import__("tests.autotune._util", fromlist=["_"]).tunetest_kernel)
        k = TKey(n_bucket=64)
        assert dispatch.select("tunetest", k)[0].backend == "cpu"  # fixed priority
        C.write_entries(cpu_file(dirs.tune), header(), [
            entry("tunetest", "cpu", k, [({"work": 1}, 2e-3)]),
            entry("tunetest", "reference", k, [({"work": 1}, 1e-3)])])
        autotune.reload()
        assert dispatch.select("tunetest", k)[0].backend == "reference"
        assert dispatch.select("tunetest", TKey(n_bucket=128))[0].backend == "reference"
        assert dispatch.select("tunetest", k, backend="cpu")[0].backend == "cpu"  # explicit still wins
    finally:
        unregister_tunetest()

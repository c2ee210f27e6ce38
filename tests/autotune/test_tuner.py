"""The tuner, for real on the CPU: it picks the faster candidate, skips broken ones,
re-times only new candidates, and dispatch uses what it wrote. Modes off/cached/missing."""
from __future__ import annotations

import json

import pytest
import torch

import posattn
from posattn import autotune, dispatch
from posattn.autotune import cache as C
from posattn.autotune import tuner

from ._util import TKey, cos_sin_key, cpu_file, register_tunetest, rope_key, unregister_tunetest

FAST = tuner.Settings(warmup=1, min_reps=3, max_reps=9, budget_s=0.005, rounds=3, max_sets=4)


@pytest.fixture
def tunetest():
    yield register_tunetest
    unregister_tunetest()


def test_picks_the_faster_of_two_unequal_candidates(dirs, tunetest):
    slow, fast = {"work": 1, "sleep_ms": 15}, {"work": 1, "sleep_ms": 0}
    tunetest([slow, fast], slow)
    [r] = tuner.tune_key("tunetest", TKey(), settings=FAST)
    assert r.best["config"] == fast
    times = {C.canon(x["config"]): x["time_s"] for x in r.results}
    assert times[C.canon(slow)] > 0.014 > times[C.canon(fast)]
    assert r.speedup > 1.5
    autotune.reload()
    assert dispatch.select("tunetest", TKey())[1] == fast


def test_redundant_work_loses(dirs, tunetest):
    """Unequal by work, not by sleeping: 200 passes over the data against one."""
    many, one = {"work": 200}, {"work": 1}
    tunetest([many, one], many)
    [r] = tuner.tune_key("tunetest", TKey(n_bucket=1 << 14), settings=FAST)
    assert r.best["config"] == one


def test_failed_and_wrong_candidates_are_recorded_never_chosen(dirs, tunetest):
    ok, wrong, boom = {"work": 3}, {"wrong": True}, {"boom": True}
    tunetest([wrong, boom, ok], ok)
    [r] = tuner.tune_key("tunetest", TKey(), settings=FAST)
    status = {C.canon(x["config"]): x["status"] for x in r.results}
    assert status == {C.canon(ok): "ok", C.canon(wrong): "mismatch", C.canon(boom): "failed"}
    assert r.best["config"] == ok
    doc = C.read_file(cpu_file(dirs.tune), writable=True)
    [e] = doc["entries"]
    assert "launch failed" in next(x["error"] for x in e["results"] if x["status"] == "failed")


def test_cpu_rope_threads_1_vs_2_for_real(dirs):
    """The cpu rope kernel over threads {1, 2}: both timed, both checked against
    the reference, the chosen one is the faster measured one and dispatch uses it."""
    k = rope_key(tokens_bucket=64, heads_q=4, heads_k=2, head_dim=64)
    space = [{"threads": 1, "chunk": 16}, {"threads": 2, "chunk": 16}]
    res = {r.backend: r for r in tuner.tune_key("rope", k, backends=["cpu"], spaces={"cpu": space},
                                                settings=FAST)}
    r = res["cpu"]
    assert r.measured == 3  # default + two
    assert all(x["status"] == "ok" for x in r.results)
    assert r.best["time_s"] == min(x["time_s"] for x in r.results)
    autotune.reload()
    assert dispatch.select("rope", k, backend="cpu")[1] == r.best["config"]
    # a second run re-times nothing; a new candidate is the only one timed
    assert tuner.tune_key("rope", k, backends=["cpu"], spaces={"cpu": space}, settings=FAST)[0].measured == 0
    r3 = tuner.tune_key("rope", k, backends=["cpu"], spaces={"cpu": space + [{"threads": 2, "chunk": 4}]},
                        settings=FAST)[0]
    assert r3.measured == 1 and len(r3.results) == 4


def test_rope_mismatch_is_caught(dirs, monkeypatch):
    """A rope config that silently writes nothing is a mismatch, not a fast win."""
    kern = dispatch.kernels("rope")["cpu"]
    real = kern.fn

    def lazy(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config):
        if config.get("chunk") == 4:
            return  # "fast": skips the work
        real(q, qo, k, ko, pos3, tables, rotary_dim, interleaved, sign, config)

    fake = type(kern)(**{**kern.__dict__, "fn": lazy})
    monkeypatch.setitem(dispatch._registry["rope"], "cpu", fake)
    k = rope_key(tokens_bucket=16)
    [r] = tuner.tune_key("rope", k, backends=["cpu"], settings=FAST,
                         spaces={"cpu": [{"threads": 1, "chunk": 4}, {"threads": 1, "chunk": 16}]})
    st = {x["config"]["chunk"]: x["status"] for x in r.results if x["config"]["threads"] == 1}
    assert st == {4: "mismatch", 16: "ok"}
    assert r.best["config"]["chunk"] != 4


def test_rotated_input_sets_exceed_the_cache():
    from posattn.autotune import fingerprint as F

    dev = F.Device("cpu", "x", "x", "x", l2_bytes=1 << 20)
    assert tuner.n_input_sets(1 << 16, dev, tuner.Settings()) * (1 << 16) >= 2 << 20
    assert tuner.n_input_sets(1 << 30, dev, tuner.Settings()) == 1
    assert tuner.n_input_sets(16, dev, tuner.Settings()) == tuner.Settings().max_sets


def _no_timing(monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("timed something")

    monkeypatch.setattr(tuner, "samples", boom)
    monkeypatch.setattr(tuner, "warm", boom)
    monkeypatch.setattr(tuner, "tune_key", boom)
    return calls


@pytest.mark.parametrize("mode", ["off", "cached"])
def test_off_and_cached_never_time_anything(dirs, monkeypatch, mode):
    calls = _no_timing(monkeypatch)
    monkeypatch.setenv("POSATTN_AUTOTUNE", mode)
    autotune.reload()
    if mode == "off":
        assert dispatch._tuned_config_lookup is None and dispatch._tuned_backend_lookup is None
    spec = posattn.RopeSpec(16)
    for s in (3, 7, 40):
        q = torch.randn(1, s, 3, 16)
        out, _ = posattn.apply_rope(q, q.clone(), torch.arange(s), spec)
        ref, _ = posattn.apply_rope(q, q.clone(), torch.arange(s), spec, backend="reference")
        torch.testing.assert_close(out, ref)
    assert calls == []
    assert not dirs.tune.exists() or not any(dirs.tune.iterdir())


def test_off_ignores_an_existing_cache(dirs, monkeypatch):
    from ._util import entry, header

    k = rope_key()
    C.write_entries(cpu_file(dirs.tune), header(), [entry("rope", "cpu", k, [({"threads": 1, "chunk": 4}, 1e-6)])])
    monkeypatch.setenv("POSATTN_AUTOTUNE", "off")
    autotune.reload()
    assert dispatch.select("rope", k, backend="cpu")[1] == {"threads": 0, "chunk": 16}


def test_missing_tunes_a_new_key_once(dirs, monkeypatch):
    monkeypatch.setenv("POSATTN_AUTOTUNE", "missing")
    autotune.reload()
    real = tuner.tune_key
    seen = []

    def spy(op, key, **kw):
        seen.append(key)
        kw["settings"] = FAST
        kw["spaces"] = {"cpu": [{"threads": 1, "chunk": 16}]}
        return real(op, key, **kw)

    monkeypatch.setattr(tuner, "tune_key", spy)
    spec = posattn.RopeSpec(16)
    q = torch.randn(1, 9, 3, 16)
    for _ in range(3):
        posattn.apply_rope(q, None, torch.arange(9), spec)
    assert len(seen) == 1 and seen[0].tokens_bucket == 16
    doc = json.loads(cpu_file(dirs.tune).read_text())
    assert [e["key"]["tokens_bucket"] for e in doc["entries"]] == [16]
    kern, cfg = dispatch.select("rope", seen[0])
    best = C.best_result(doc["entries"][0])["config"]
    assert kern.backend == "cpu" and cfg == best
    posattn.apply_rope(torch.randn(1, 30, 3, 16), None, torch.arange(30), spec)  # new bucket: tuned too
    assert len(seen) == 2


def test_bad_mode_warns_and_uses_cached(dirs, monkeypatch, caplog):
    monkeypatch.setenv("POSATTN_AUTOTUNE", "sometimes")
    assert autotune.mode() == "cached"


def test_search_spaces_beside_the_kernels_are_pruned():
    ks = dispatch.kernels("rope")
    k = rope_key(tokens_bucket=4, heads_q=3, heads_k=1, head_dim=16)
    cpu = ks["cpu"].search_space(k)
    assert cpu and all(c["threads"] <= 4 and c["threads"] * c["chunk"] <= 4 or c["chunk"] == 4 or c["threads"] == 1
                       for c in cpu)
    tri = ks["triton"].search_space(k)
    assert tri and all(c["BLOCK_H"] <= 4 for c in tri)  # no block taller than the heads (3 -> 4)
    cu = ks["cuda"].search_space(k)
    assert cu and all(c["threads"] % 32 == 0 for c in cu)


@pytest.mark.parametrize("op, make_key", [("rope", rope_key), ("rope_cos_sin", cos_sin_key)])
def test_triton_candidates_tune_under_the_interpreter(dirs, op, make_key):
    from posattn.kernels import triton as tk

    if not tk.device_ok("cpu"):
        pytest.skip("Triton cannot take CPU tensors here (no TRITON_INTERPRET)")
    k = make_key(tokens_bucket=2, heads_q=2, heads_k=1, head_dim=16)
    space = [{"BLOCK_H": 1, "num_warps": 1}, {"BLOCK_H": 2, "num_warps": 1}]
    s = tuner.Settings(warmup=1, min_reps=1, max_reps=2, rounds=1, max_sets=1)
    [r] = tuner.tune_key(op, k, backends=["triton"], spaces={"triton": space}, settings=s)
    assert r.best is not None and all(x["status"] == "ok" for x in r.results)


def test_cpu_rope_cos_sin_threads_1_vs_2_for_real(dirs):
    """The cpu cos/sin kernel over threads {1, 2} on transformers-style split tables (interleaved,
    partial rotary): both timed and checked against the fp64 reference; dispatch uses the faster.
    (The cos_sin_cache form is tuned end to end in tests/autotune/test_cli.py.)"""
    k = cos_sin_key(split=True, pos_dtype="", rotary_dim=32, interleaved=True)
    space = [{"threads": 1, "chunk": 16}, {"threads": 2, "chunk": 16}]
    [r] = tuner.tune_key("rope_cos_sin", k, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    assert r.measured == 3 and all(x["status"] == "ok" for x in r.results)
    assert r.best["time_s"] == min(x["time_s"] for x in r.results)
    autotune.reload()
    assert dispatch.select("rope_cos_sin", k, backend="cpu")[1] == r.best["config"]


def test_rope_cos_sin_mismatch_is_caught(dirs, monkeypatch):
    """A cos/sin config that reads the sines as cosines is a mismatch, not a win."""
    kern = dispatch.kernels("rope_cos_sin")["cpu"]
    real = kern.fn

    def swapped(q, qo, k, ko, c1, s1, c2, s2, pos2, *rest):
        if rest[-1].get("chunk") == 4:
            c1, s1, c2, s2 = s1, c1, s2, c2
        real(q, qo, k, ko, c1, s1, c2, s2, pos2, *rest)

    monkeypatch.setitem(dispatch._registry["rope_cos_sin"], "cpu", type(kern)(**{**kern.__dict__, "fn": swapped}))
    k = cos_sin_key(tokens_bucket=16, split=True, pos_dtype="")
    [r] = tuner.tune_key("rope_cos_sin", k, backends=["cpu"], settings=FAST,
                         spaces={"cpu": [{"threads": 1, "chunk": 4}, {"threads": 1, "chunk": 16}]})
    st = {x["config"]["chunk"]: x["status"] for x in r.results if x["config"]["threads"] == 1}
    assert st == {4: "mismatch", 16: "ok"}


def test_rope_cos_sin_search_spaces_are_pruned():
    ks = dispatch.kernels("rope_cos_sin")
    k = cos_sin_key(tokens_bucket=4, heads_q=3, heads_k=1, head_dim=16)
    cpu = ks["cpu"].search_space(k)
    assert cpu and all(c["threads"] <= 4 for c in cpu)
    tri = ks["triton"].search_space(k)
    assert tri and all(c["BLOCK_H"] <= 4 for c in tri)
    # 4 x 8 pairs per token, 4 tokens: a 1024-thread block would idle most of its threads
    cu = ks["cuda"].search_space(k)
    assert cu and all(c["threads"] % 32 == 0 for c in cu) and {"threads": 1024} not in cu
    assert {"threads": 1024} in ks["cuda"].search_space(cos_sin_key(tokens_bucket=4096, heads_q=32, heads_k=8,
                                                                     head_dim=128))


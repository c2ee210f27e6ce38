"""The op registry and the sweep runner, on a toy op whose answers are known."""
import pytest
import torch

from posattn.bench import registry, runner
from posattn.bench.registry import BenchOp, Shape, Unsupported


def _toy_op():
    op = BenchOp(
        name="toy", title="y = 2x",
        make_inputs=lambda shape, dtype, device: {"x": torch.randn(shape.dims["N"], dtype=dtype, device=device)},
        reference=lambda inp: (inp["x"].double() * 2,),
        sweep=lambda mode, dev: [Shape({"N": 64}, 64), Shape({"N": 4096}, 4096)][: 1 if mode == "quick" else 2],
        dtypes=lambda mode, dev: [torch.float32],
        bytes=lambda shape, dtype: 8 * shape.dims["N"], flops=lambda shape, dtype: shape.dims["N"],
        parse_shape=lambda text: Shape({"N": int(text.split("=")[1])}, int(text.split("=")[1])),
        size_name="elements", baseline=("good",))

    @op.backend("good")
    def _(inp, dev):
        x = inp["x"]
        return lambda: x * 2

    @op.backend("wrong")
    def _(inp, dev):
        x = inp["x"]
        return lambda: x * 3

    @op.backend("small-only")
    def _(inp, dev):
        if inp["x"].numel() > 100:
            raise Unsupported("small inputs only")
        x = inp["x"]
        return lambda: (x + x,)

    @op.backend("broken")
    def _(inp, dev):
        def fn():
            raise RuntimeError("kernel exploded")
        return fn

    @op.peer("missing", available=lambda dev: (False, "libfoo is not installed"))
    def _(inp, dev):  # pragma: no cover - never called
        raise AssertionError

    @op.peer("slowpeer", full_only=True)
    def _(inp, dev):
        x = inp["x"]
        return lambda: torch.mul(x, 2)

    return op


@pytest.fixture
def toy(monkeypatch):
    op = _toy_op()
    registry.ops()  # load the real op modules first, so that they do not land in the patched registry
    monkeypatch.setattr(registry, "_OPS", {"toy": op})
    monkeypatch.setattr(registry, "_SKIPPED", {"later": "posattn has no later_op yet"})
    return op


def _metric(rows, backend, metric, size=None):
    return [r for r in rows if r["backend"] == backend and r["metric"] == metric
            and (size is None or r["size"] == size)]


def test_quick_run_records_rows_skips_and_errors(toy, tmp_path):
    cfg = runner.RunConfig(mode="quick", device="cpu", results_path=tmp_path / "r.jsonl", target_s=0.002,
                           measure_peaks=False)
    res = runner.run(cfg, log=lambda m: None)
    backends = {r["backend"] for r in res.rows}
    assert backends == {"good", "wrong", "small-only"}
    assert _metric(res.rows, "good", "max_abs_err")[0]["p50"] == 0.0
    assert _metric(res.rows, "wrong", "max_abs_err")[0]["p50"] > 0.1  # the accuracy check sees wrong answers
    sp = _metric(res.rows, "wrong", "speedup")
    assert sp and sp[0]["baseline"] == "good" and sp[0]["p20"] <= sp[0]["p50"] <= sp[0]["p80"]
    assert not _metric(res.rows, "good", "speedup")
    thr = _metric(res.rows, "good", "throughput")[0]
    lat = _metric(res.rows, "good", "latency")[0]
    assert thr["p50"] == pytest.approx(8 * 64 / (lat["p50"] * 1e-6) / 1e9)
    assert thr["p20"] <= thr["p50"] <= thr["p80"]
    assert not _metric(res.rows, "good", "roofline")  # no peaks measured, no roofline
    reasons = {(o, i): why for o, i, why in res.skipped}
    assert reasons[("toy", "missing")] == "libfoo is not installed"
    assert "full sweep only" in reasons[("toy", "slowpeer")]
    assert reasons[("later", "*")] == "posattn has no later_op yet"
    assert [(e[1], "kernel exploded" in e[3]) for e in res.errors] == [("broken", True)]
    for r in res.rows:
        for k in ("op", "backend", "kind", "shape", "shape_key", "size", "dtype", "metric", "unit", "p20", "p50",
                  "p80", "device", "versions", "git_commit", "command", "timer", "run_id", "timestamp"):
            assert k in r, k
        assert r["command"].startswith("posattn bench --op toy --backend ")


def test_full_run_includes_full_only_and_unsupported_is_skipped(toy, tmp_path):
    cfg = runner.RunConfig(mode="full", device="cpu", target_s=0.002, measure_peaks=False)
    res = runner.run(cfg, log=lambda m: None)
    assert _metric(res.rows, "slowpeer", "latency")
    assert _metric(res.rows, "small-only", "latency", size=64)
    assert not _metric(res.rows, "small-only", "latency", size=4096)
    assert any(i == "small-only" and "small inputs only" in why for _, i, why in res.skipped)


def test_filters_and_bad_names(toy):
    res = runner.run(runner.RunConfig(device="cpu", impls=["good"], shapes=["N=32"], target_s=0.002,
                                      measure_peaks=False), log=lambda m: None)
    assert {(r["backend"], r["size"]) for r in res.rows} == {("good", 32)}
    with pytest.raises(ValueError, match="--op 'nope'"):
        runner.run(runner.RunConfig(device="cpu", ops=["nope"], measure_peaks=False), log=lambda m: None)
    with pytest.raises(ValueError, match="--backend zzz"):
        runner.run(runner.RunConfig(device="cpu", impls=["zzz"], measure_peaks=False), log=lambda m: None)


def test_no_reference_means_no_accuracy_row(toy, monkeypatch):
    monkeypatch.setattr(toy, "reference", lambda inp: None)
    res = runner.run(runner.RunConfig(device="cpu", impls=["good", "wrong"], target_s=0.002,
                                      measure_peaks=False), log=lambda m: None)
    assert _metric(res.rows, "good", "latency") and not [r for r in res.rows if r["metric"] == "max_abs_err"]


def test_time_budget_truncates(toy):
    res = runner.run(runner.RunConfig(mode="full", device="cpu", time_budget_s=1e-9, measure_peaks=False),
                     log=lambda m: None)
    assert res.truncated and not res.rows


def test_duplicate_registration_is_refused():
    op = _toy_op()
    with pytest.raises(ValueError, match="registered twice"):
        op.backend("good")(lambda inp, dev: None)


def test_rope_cases_are_registered():
    ops = registry.ops()
    rope = ops["rope"]
    assert {"cuda", "triton", "cpu", "reference"} <= set(rope.impls)
    assert {"transformers", "torch.compile", "liger", "flashinfer", "flash-attn"} <= set(rope.impls)
    assert all(rope.impls[p].kind == "peer" for p in ("transformers", "liger", "flashinfer", "flash-attn"))
    for mode in ("quick", "full"):
        for dev in ("cpu", "cuda"):
            shapes = rope.sweep(mode, dev)
            assert shapes and [s.size for s in shapes] == sorted(s.size for s in shapes)
            assert rope.dtypes(mode, dev)
    s = rope.parse_shape("B=2,S=7,Hq=3,Hk=1,D=80")
    assert s.dims == {"B": 2, "S": 7, "Hq": 3, "Hk": 1, "D": 80} and s.size == 14
    with pytest.raises(ValueError, match="--shape"):
        rope.parse_shape("S=seven")
    with pytest.raises(ValueError, match="unknown dimension"):
        rope.parse_shape("B=1,T=4")
    # peers that need CUDA say so on a CPU
    assert rope.impls["liger"].available("cpu") == (False, "CUDA only")
    assert rope.impls["cpu"].available("cuda")[0] is False


def test_rope_bytes_and_flops():
    import torch as T

    rope = registry.ops()["rope"]
    s = rope.parse_shape("B=1,S=10,Hq=4,Hk=2,D=64")
    elems = 10 * 6 * 64
    assert rope.bytes(s, T.bfloat16) == 2 * elems * 2 + 10 * 8
    assert rope.flops(s, T.float32) == 3 * elems

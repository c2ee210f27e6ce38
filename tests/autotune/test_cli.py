"""posattn tune / posattn cache, in-process (tiny CPU shapes, tiny budgets)."""
from __future__ import annotations

import json

import pytest

from posattn import autotune, dispatch
from posattn.autotune import cache as C
from posattn.autotune import cli as tune_cli
from posattn.autotune import shapes, workers
from posattn.autotune import fingerprint as F
from posattn.autotune import presets
from posattn.cli import main

from ._util import cos_sin_key, cpu_file, entry, header, rope_key

TUNE = ["tune", "--backends", "cpu", "--dtype", "fp32", "--budget-ms", "1", "--devices", "cpu"]


def _tiny_config(tmp_path, **extra):
    cfg = {"model_type": "qwen2", "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1,
           "rope_theta": 1e6, "partial_rotary_factor": 0.5, **extra}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


def test_tune_hf_config_then_show_validate_export_clear(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("POSATTN_TUNE_DIR")  # write to the user cache
    autotune.reload()
    p = _tiny_config(tmp_path)
    assert main(TUNE + ["--hf-config", str(p), "--tokens", "3,16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cpu_rows = [r for r in rows if r["backend"] == "cpu"]
    assert [r["key"] for r in cpu_rows] == ["float32 D16 R8 Hq3 Hk1 T4", "float32 D16 R8 Hq3 Hk1 T16"]
    assert all(r["status"] == "ok" and r["config"] and r["time_us"] > 0 for r in cpu_rows)
    path = cpu_file(dirs.user)
    doc = C.read_file(path, writable=True)
    assert {e["key"]["tokens_bucket"] for e in doc["entries"]} == {4, 16}
    assert {e["key"]["rotary_dim"] for e in doc["entries"]} == {8}
    # dispatch now uses it
    k = rope_key(tokens_bucket=4, heads_q=3, heads_k=1, head_dim=16, rotary_dim=8)
    assert dispatch.select("rope", k, backend="cpu")[1] == cpu_rows[0]["config"]

    assert main(["cache", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == 2 and all(r["layer"] == "user" and not r["stale"] for r in shown)
    assert main(["cache", "show"]) == 0
    assert "rope" in capsys.readouterr().out
    assert main(["cache", "validate"]) == 0
    capsys.readouterr()

    out = tmp_path / "export"
    assert main(["cache", "export", "-o", str(out)]) == 0
    exported = out / f"{F.cpu_device().slug}.json"
    edoc = C.read_file(exported, writable=False)
    assert len(edoc["entries"]) == 2 and all(len(e["results"]) <= 2 for e in edoc["entries"])

    assert main(["cache", "clear"]) == 0
    assert not dirs.user.exists()
    # the export is in the shipped format: as shipped configs it serves the same keys
    dirs.shipped.mkdir()
    exported.rename(dirs.shipped / exported.name)
    autotune.reload()
    assert dispatch.select("rope", k, backend="cpu")[1] == cpu_rows[0]["config"]


def test_validate_reports_a_bad_file(dirs, capsys):
    C.write_entries(cpu_file(dirs.tune), header(), [entry("rope", "cpu", rope_key(), [({"threads": 1}, 1e-5)])])
    bad = dirs.tune / "other.json"
    bad.write_text('{"format": "posattn-tune", "schema_version": 1, "header": {"fingerprint": "x"}, "entries": [')
    assert main(["cache", "validate"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "other.json" in out and "ok" in out
    assert bad.exists()  # validate changes nothing


def test_preset_and_quick_flags(dirs, capsys):
    assert main(["tune", "--list-presets"]) == 0
    assert "llama3-8b" in capsys.readouterr().out
    shape = shapes.model_shape(presets.get("llama3-8b"), "p")
    assert (shape.heads_q, shape.heads_k, shape.head_dim, shape.rotary_dim) == (32, 8, 128, 128)
    shape = shapes.model_shape(presets.get("gpt-neox-20b"), "p")
    assert (shape.head_dim, shape.rotary_dim) == (96, 24)


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "nope"], "--preset must be one of"),
    (["--preset", "llama3-8b", "--dtype", "int8"], "--dtype must be"),
    (["--preset", "llama3-8b", "--tokens", "1,x"], "--tokens must be"),
    (["--preset", "llama3-8b", "--tokens", "0"], "--tokens must be positive"),
    (["--preset", "llama3-8b", "--ops", "softmax"], "--ops"),
    ([], "--hf-config PATH or --preset NAME"),
])
def test_bad_arguments(dirs, capsys, argv, msg):
    assert main(["tune"] + argv) == 2
    assert msg in capsys.readouterr().err


def test_hf_config_errors(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    assert main(["tune", "--hf-config", str(p)]) == 2
    assert "JSON object" in capsys.readouterr().err
    p.write_text(json.dumps({"hidden_size": 64}))
    assert main(["tune", "--hf-config", str(p)]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


def test_worker_process_path(dirs, tmp_path):
    """The one-process-per-device path (spawned worker), run with the CPU as its device."""
    shape = shapes.ModelShape(3, 1, 16, 16, False, "test")
    rows = workers.run_tuning(["rope"], shape, "float32", [8], ["cpu"], backends=["cpu"], budget_s=0.001,
                           show_progress=False, processes=True)
    assert [r["status"] for r in rows if r["backend"] == "cpu"] == ["ok"]
    doc = C.read_file(cpu_file(dirs.tune), writable=True)
    assert [e["key"]["tokens_bucket"] for e in doc["entries"]] == [8]


def test_tune_rope_cos_sin_both_forms(dirs, tmp_path, capsys):
    """`posattn tune --ops rope_cos_sin`: the cos_sin_cache and the transformers form of each
    bucket, tuned on the cpu kernel, written to the cache and used by dispatch."""
    p = _tiny_config(tmp_path)
    assert main(TUNE + ["--ops", "rope_cos_sin", "--hf-config", str(p), "--tokens", "16", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["backend"] == "cpu"]
    assert [r["key"] for r in rows] == ["float32 table=float32 D16 R8 pos=int64 Hq3 Hk1 T16",
                                        "float32 table=float32 D16 R8 split per-token Hq3 Hk1 T16"]
    assert all(r["op"] == "rope_cos_sin" and r["status"] == "ok" and r["time_us"] > 0 for r in rows)
    doc = C.read_file(cpu_file(dirs.tune), writable=True)
    assert sorted(e["key"]["split"] for e in doc["entries"] if e["op"] == "rope_cos_sin") == [False, True]
    autotune.reload()
    k = cos_sin_key(tokens_bucket=16, heads_q=3, heads_k=1, head_dim=16, rotary_dim=8, split=True, pos_dtype="")
    assert dispatch.select("rope_cos_sin", k, backend="cpu")[1] == rows[1]["config"]


def test_a_config_posattn_cannot_read_is_an_error_not_a_plain_spec(tmp_path, capsys):
    """An unknown rope_type used to be logged and tuned as a plain RopeSpec (a fallback around
    RopeSpec.from_hf_config); now it is an error that names the file and the rope_type."""
    p = _tiny_config(tmp_path, rope_scaling={"rope_type": "warp-drive", "factor": 2.0})
    assert main(TUNE + ["--hf-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "warp-drive" in err


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_reads_through_from_hf_config(name):
    """No fallback hides a preset that RopeSpec.from_hf_config cannot read."""
    shape = shapes.model_shape(presets.get(name), name)
    assert 0 < shape.rotary_dim <= shape.head_dim and shape.heads_q % shape.heads_k == 0


def test_layer_type_picks_one_rope_of_a_per_layer_type_config():
    cfg = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 32, "layer_types": ["sliding_attention", "full_attention"],
           "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    with pytest.raises(ValueError, match="--layer-type"):
        shapes.model_shape(cfg, "cfg")
    shape = shapes.model_shape(cfg, "cfg", "full_attention")
    assert (shape.heads_q, shape.heads_k, shape.head_dim, shape.rotary_dim) == (2, 1, 32, 32)


def test_an_ops_key_builder_is_one_module_and_one_registration(monkeypatch):
    """keys.KEY_BUILDERS maps an op to a module with keys(shape, dtype, tokens, device_type):
    registering one makes `posattn tune` build that op's jobs."""
    import sys
    import types

    from posattn.autotune import keys as K

    mod = types.ModuleType("posattn_test_keys_toy")
    mod.keys = lambda shape, dtype, tokens, device_type: [("toy", shape.head_dim, dtype, t, device_type)
                                                          for t in tokens]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(K.KEY_BUILDERS, "toy", mod.__name__)
    shape = shapes.ModelShape(3, 1, 16, 16, False, "test")
    jobs = workers.jobs_for(["toy", "rope"], shape, "float32", [3, 16], "cpu")
    assert [j.key for j in jobs if j.op == "toy"] == [("toy", 16, "float32", 3, "cpu"), ("toy", 16, "float32", 16, "cpu")]
    assert [j.key.tokens_bucket for j in jobs if j.op == "rope"] == [4, 16]
    assert "toy" in K.ops()


def test_tune_ops_all_tunes_every_tunable_op(dirs, tmp_path, capsys):
    """`posattn tune --ops all` (what `make demo` runs): every op with a key builder gets tuned rows."""
    p = _tiny_config(tmp_path)
    assert main(TUNE + ["--ops", "all", "--hf-config", str(p), "--tokens", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in rows if r["status"] == "ok"} == set(tune_cli.OPS)

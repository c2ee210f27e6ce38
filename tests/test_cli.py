"""The posattn command: info and list (bench/dashboard/tune have their own tests)."""
import json
import subprocess
import sys

from posattn import cli, dispatch


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["posattn"]
    assert set(info["backends"]) == set(dispatch.BACKENDS)
    assert info["backends"]["reference"]["usable"] is True
    for name, b in info["backends"].items():
        # every unusable backend says why
        assert b["usable"] or b["why_not"], name


def test_list_json(capsys):
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rope = {r["backend"] for r in rows if r["op"] == "rope"}
    assert rope == {"reference", "cpu", "triton", "cuda"}


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "posattn", "list"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rope" in out.stdout


def test_unknown_command_fails():
    out = subprocess.run([sys.executable, "-m", "posattn", "frobnicate"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_info_says_per_device_and_backend_whether_verified(capsys, tmp_path, monkeypatch):
    """A (faked) H200 with a shipped cuda config for rope_cos_sin: cuda is verified there,
    triton is not; the CPU has no tuned entry at all."""
    from posattn import autotune
    from posattn import device as pdev
    from posattn.autotune import cache as C
    from posattn.device import Device
    from posattn.rope.cos_sin import CosSinKey

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("POSATTN_TUNE_DIR", str(tmp_path / "tune"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(C, "shipped_dir", lambda: shipped)
    h200 = Device("cuda", "NVIDIA H200", "nvidia-h200", "nvidia-h200-cc90-sm132", capability="9.0")
    real = pdev.device_for
    monkeypatch.setattr(pdev, "device_for", lambda t, i=None: h200 if t == "cuda" else real(t, i))
    monkeypatch.setattr(cli, "_devices", lambda: [("cpu", None), ("cuda", 0)])
    key = CosSinKey("cuda", "bfloat16", "float32", 128, 128, False, False, "int64", 32, 8, 64)
    fields = C.key_fields(key)
    C.write_entries(shipped / "nvidia-h200.json", {"fingerprint": h200.fingerprint, "device": {}, "versions": {}},
                    [{"op": "rope_cos_sin", "backend": "cuda", "version": 1, "key": fields,
                      "bucket_fields": C.bucket_fields(fields), "default": {},
                      "results": [{"config": {"threads": 256}, "status": "ok", "time_s": 1e-5, "error": ""}],
                      "updated": C.now_iso()}])
    autotune.reload()
    try:
        assert cli.main(["info", "--json"]) == 0
        devs = {d["device"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
        gpu = devs["cuda:0"]
        assert gpu["name"] == "NVIDIA H200"
        assert gpu["backends"]["cuda"]["verified"] is True
        assert gpu["backends"]["cuda"]["ops"] == ["rope_cos_sin"]
        assert gpu["backends"]["cuda"]["layers"] == ["shipped"]
        assert gpu["backends"]["triton"]["verified"] is False
        assert "not verified" in gpu["backends"]["triton"]["note"]
        assert set(devs["cpu"]["backends"]) == {"cpu", "triton", "reference"}
        assert devs["cpu"]["backends"]["cpu"]["verified"] is False
        # the table form says the same
        assert cli.main(["info"]) == 0
        out = capsys.readouterr().out
        assert "verified" in out and "rope_cos_sin" in out
    finally:
        monkeypatch.undo()
        autotune.reload()

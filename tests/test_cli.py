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

"""Writers in other processes: two at once keep both sets of keys; a SIGKILLed tuner
leaves a file that parses. Tiny workloads, real subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from posattn.autotune import cache as C

from ._util import cpu_file

ROOT = Path(__file__).resolve().parents[2]


def _spawn(*args, env=None, module="tests.autotune._util"):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=str(ROOT), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_writing_the_same_cache(tmp_path):
    path = tmp_path / "shared.json"
    n = 40
    procs = [_spawn(str(path), tag, str(n), module="tests.autotune._writer") for tag in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    doc, why = C.parse(path.read_bytes())
    assert doc is not None, why
    keys = sorted(e["key"]["dtype"] for e in doc["entries"])
    assert keys == sorted([f"a{i}" for i in range(n)] + [f"b{i}" for i in range(n)])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.bad-*"))


def test_sigkilled_tuner_leaves_a_valid_file(dirs):
    path = cpu_file(dirs.tune)
    env = {"POSATTN_TUNE_DIR": str(dirs.tune), "XDG_CACHE_HOME": str(dirs.user.parents[2])}
    for attempt, wait_keys in enumerate((3,)):
        p = _spawn("tune", "1000", env=env)
        try:
            seen = 0
            deadline = time.monotonic() + 90
            while seen < wait_keys + attempt * 5 and time.monotonic() < deadline:
                line = p.stdout.readline()
                if not line:
                    break
                seen += line.startswith("key ")
            assert seen >= wait_keys, p.stderr.read()
            time.sleep(0.013 * (attempt + 1))  # land somewhere inside the next key
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        doc, why = C.parse(path.read_bytes())
        assert doc is not None, why
        assert len(doc["entries"]) >= seen  # every finished key is in the file
        assert not list(dirs.tune.glob("*.bad-*"))
    # the lock died with the process: a new writer goes through at once
    t0 = time.monotonic()
    C.write_entries(path, doc["header"], [])
    assert time.monotonic() - t0 < 5

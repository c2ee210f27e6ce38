"""Ahead-of-time Triton compiles in child processes (no TRITON_INTERPRET there), shared by the
*_aot tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

# A sharded compile script starts with this line (the shard this child compiles) and skips
# every job whose running index j has j % shards != shard.
SHARD_LINE = "shard, shards = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 1)"


def compile_in_child(script: str, shards: int = 1) -> list[dict]:
    """Run ``script`` (which prints one JSON line) in a child without TRITON_INTERPRET.

    shards > 1: that many children at once, child i with ``sys.argv[1:] == [i, shards]`` (a
    script that reads them compiles every shards-th job from i): compiles are independent and
    CPU-bound, so the wide cases take half the time on CI's two cores. The children's lists
    are concatenated (shard 0's first)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(shards)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(shards)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-4000:]
        out += json.loads(stdout.strip().splitlines()[-1])
    return out

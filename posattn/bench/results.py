"""Results as long-format JSON lines, appended and upserted on a unique key.

One row per (op, backend, shape, dtype, metric, device):

    {"op": "rope", "backend": "cpu", "kind": "posattn", "shape": {...}, "shape_key": "B=1,S=64,...",
     "size": 64, "dtype": "float32", "metric": "latency", "unit": "us", "p20": .., "p50": .., "p80": ..,
     "device": {fingerprint}, "versions": {...}, "git_commit": "...", "command": "posattn bench ...",
     "timer": "perf_counter", "cold_l2": true, "reps": 40, "run_id": "...", "timestamp": "..."}

Rows with the same :func:`row_key` replace each other; anything else is kept.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

KEY_FIELDS = ("op", "backend", "shape_key", "dtype", "metric")

# metric -> (unit, higher is better)
METRICS = {
    "latency": ("us", False),
    "throughput": ("GB/s", True),
    "tflops": ("TFLOP/s", True),
    "roofline": ("%", True),
    "speedup": ("x", True),
    "max_abs_err": ("", False),
}


def row_key(row: dict) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS) + ((row.get("device") or {}).get("slug"),)


def load(paths) -> list[dict]:
    """Rows from JSONL files or directories (searched recursively for results*.jsonl), in order.

    Inside a directory only files named ``results*.jsonl`` are read, so other
    JSON lines kept beside them (e.g. a standalone script's raw output) are not
    mistaken for result rows; a file named explicitly must hold result rows.

    Each row gets ``_source`` (the file it came from) for grouping into result sets.
    """
    rows: list[dict] = []
    for p in _expand(paths):
        with open(p) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: not a JSON line ({e})") from None
                if not isinstance(r, dict) or "op" not in r or "metric" not in r:
                    raise ValueError(f"{p}:{i}: not a posattn result row (needs 'op' and 'metric')")
                r["_source"] = str(p)
                rows.append(r)
    return rows


def _expand(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.rglob("results*.jsonl")))
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"results path {str(p)!r} does not exist")
    return out


def _existing_rows(path: Path) -> list[dict]:
    """The result rows already in ``path`` (held under its lock). A file that is not all
    result rows (an older format, another tool's output, a torn write) is renamed to
    ``<name>.bad-<time>-<pid>`` with a warning, never deleted, and the run starts a new one."""
    if not path.exists():
        return []
    try:
        rows = load([path])
    except (ValueError, UnicodeDecodeError) as e:
        dest = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
        os.replace(path, dest)
        warnings.warn(f"posattn bench: {e}; set that file aside as {dest.name} and started a new {path.name}",
                      stacklevel=3)
        return []
    for r in rows:
        r.pop("_source", None)
    return rows


def upsert(path, new_rows: list[dict]) -> int:
    """Merge ``new_rows`` into the JSONL file at ``path`` (rows with an equal key are
    replaced in place, new keys appended). Atomic (temp file + rename), locked.
    Returns the number of rows in the file afterwards."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(path)):
        old = _existing_rows(path)
        index = {row_key(r): i for i, r in enumerate(old)}
        for r in new_rows:
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            i = index.get(row_key(r))
            if i is None:
                index[row_key(r)] = len(old)
                old.append(r)
            else:
                old[i] = r
        fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            for r in old:
                f.write(json.dumps(r, sort_keys=False) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    return len(old)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _lock_path(path: Path) -> str:
    # beside the temp files, not the results, so that committed result folders stay clean
    import hashlib

    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"posattn-results-{h}.lock")


def git_commit() -> str | None:
    """The posattn checkout's commit (with -dirty when it has changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Versions of what the numbers depend on (peers by distribution metadata, without importing)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("posattn", "torch", "triton", "transformers", "liger-kernel", "flashinfer-python",
                 "flash-attn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import posattn

        out["posattn"] = posattn.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.version.cuda:
            out["torch_cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out

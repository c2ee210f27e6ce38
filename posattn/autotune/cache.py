"""The on-disk cache of tuned launch configs: format, validation, layers, writes.

File format (JSON, nothing in it is ever executed)::

    {"format": "posattn-tune", "schema_version": 1,
     "header": {"fingerprint": ..., "device": {...}, "versions": {...}, "updated": ...},
     "entries": [
        {"op": "rope", "backend": "cpu", "version": 1,
         "key": {<kernel key fields, in the dataclass's order>},
         "bucket_fields": ["tokens_bucket"],
         "default": {<the kernel's heuristic config>},
         "results": [{"config": {...}, "status": "ok" | "failed" | "mismatch",
                      "time_s": 1.2e-05 | null, "error": "..."}],
         "updated": "2026-11-28T21:00:00Z"}]}

An entry is identified by (op, backend, kernel version, key). The key holds
the shape-bucket fields (names ending in ``_bucket``, powers of two) like
any other field; ``bucket_fields`` says which they are so that an untuned
bucket can be served by the nearest tuned one. Per-config results are
stored, so adding a candidate to a search space only measures the new one.

Lookup layers, first match wins: ``$POSATTN_TUNE_DIR/<fingerprint>.json``,
then the user cache ``<platformdirs cache>/posattn/tune/v1/<fingerprint>.json``,
then the package's ``posattn/autotune/configs/<gpu-slug>.json``, then the
kernel's heuristic default. An exact key in any layer beats a nearest
bucket in any layer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("posattn.autotune")

FORMAT = "posattn-tune"
SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "mismatch")
LOCK_TIMEOUT_S = 120.0

_logged: set = set()


def log_once(level: int, msg: str, *args) -> None:
    """Log a message once per process (fallback notices must not repeat per call)."""
    k = (level, msg, args)
    if k not in _logged:
        _logged.add(k)
        log.log(level, msg, *args)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------
# locations


def tune_dir_env() -> Path | None:
    d = os.environ.get("POSATTN_TUNE_DIR")
    return Path(d).expanduser() if d else None


def user_cache_dir() -> Path:
    """``<user cache>/posattn/tune/v1`` (platformdirs; $XDG_CACHE_HOME on Linux)."""
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("posattn", appauthor=False))
    except ImportError:  # a declared dependency; keep lookups alive without it
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posattn"
    return base / "tune" / f"v{SCHEMA_VERSION}"


def shipped_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def write_dir() -> Path:
    """Where tuning results go: $POSATTN_TUNE_DIR when set, else the user cache."""
    return tune_dir_env() or user_cache_dir()


def layer_paths(fingerprint: str, slug: str) -> list[tuple[str, Path, bool]]:
    """[(layer name, file, writable)] in lookup order."""
    out = []
    td = tune_dir_env()
    if td is not None:
        out.append(("POSATTN_TUNE_DIR", td / f"{fingerprint}.json", True))
    out.append(("user", user_cache_dir() / f"{fingerprint}.json", True))
    out.append(("shipped", shipped_dir() / f"{slug}.json", False))
    return out


# ---------------------------------------------------------------------------
# validation (an explicit schema check; json.loads is the only parser used)


class SchemaError(ValueError):
    pass


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: {what}")


def _check_config(c, where: str) -> None:
    _check(isinstance(c, dict), where, "must be an object")
    for k, v in c.items():
        _check(isinstance(k, str) and len(k) <= 64, where, f"bad config name {k!r}")
        _check(v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v)),
               where, f"config value {k!r} must be a scalar, got {type(v).__name__}")
        _check(not isinstance(v, str) or len(v) <= 64, where, f"config value {k!r} too long")


def validate(doc: Any) -> None:
    """Raise SchemaError unless ``doc`` is a cache file of this schema version."""
    _check(isinstance(doc, dict), "file", "top level must be an object")
    _check(doc.get("format") == FORMAT, "file", f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    sv = doc.get("schema_version")
    _check(sv == SCHEMA_VERSION, "file", f"schema_version {sv!r} is not {SCHEMA_VERSION} (foreign version)")
    hdr = doc.get("header")
    _check(isinstance(hdr, dict), "header", "must be an object")
    _check(isinstance(hdr.get("fingerprint"), str), "header.fingerprint", "must be a string")
    for k in ("device", "versions"):
        _check(isinstance(hdr.get(k, {}), dict), f"header.{k}", "must be an object")
    ents = doc.get("entries")
    _check(isinstance(ents, list), "entries", "must be a list")
    for i, e in enumerate(ents):
        w = f"entries[{i}]"
        _check(isinstance(e, dict), w, "must be an object")
        _check(isinstance(e.get("op"), str) and e["op"], w + ".op", "must be a non-empty string")
        _check(isinstance(e.get("backend"), str) and e["backend"], w + ".backend", "must be a non-empty string")
        v = e.get("version")
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, w + ".version", "must be an int >= 0")
        key = e.get("key")
        _check(isinstance(key, dict) and key, w + ".key", "must be a non-empty object")
        for kk, kv in key.items():
            ok = _is_scalar(kv) or (isinstance(kv, list) and all(_is_scalar(x) for x in kv))
            _check(ok, w + ".key", f"field {kk!r} must be a scalar or a list of scalars")
        bf = e.get("bucket_fields", [])
        _check(isinstance(bf, list) and all(isinstance(b, str) and b in key for b in bf), w + ".bucket_fields",
               "must list fields of key")
        for b in bf:
            bv = key[b]
            _check(isinstance(bv, int) and not isinstance(bv, bool) and bv >= 1 and (bv & (bv - 1)) == 0,
                   w + f".key.{b}", f"a bucket must be a power of two, got {bv!r}")
        _check_config(e.get("default", {}), w + ".default")
        res = e.get("results")
        _check(isinstance(res, list), w + ".results", "must be a list")
        for j, r in enumerate(res):
            rw = f"{w}.results[{j}]"
            _check(isinstance(r, dict), rw, "must be an object")
            _check_config(r.get("config"), rw + ".config")
            _check(r.get("status") in STATUSES, rw + ".status", f"must be one of {STATUSES}")
            t = r.get("time_s")
            if r["status"] == "ok":
                _check(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0,
                       rw + ".time_s", "an ok result needs a positive time")
            _check(isinstance(r.get("error", ""), str), rw + ".error", "must be a string")


# ---------------------------------------------------------------------------
# reading


def read_file(path: Path, *, writable: bool) -> dict | None:
    """The validated document at ``path``, or None when absent or unusable.

    A corrupt, truncated or foreign-version file is set aside (renamed, never
    deleted) with a warning when its layer is writable, else ignored with a
    warning. Never raises for a bad file.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log_once(logging.WARNING, "posattn autotune: cannot read %s (%s); ignoring it", str(path), str(e))
        return None
    doc, why = parse(raw)
    if doc is not None:
        return doc
    if writable:
        moved = set_aside(path, raw)
        log.warning("posattn autotune: %s is not a valid cache file (%s); set aside as %s",
                    path, why, moved or "(already moved by another process)")
    else:
        log_once(logging.WARNING, "posattn autotune: ignoring invalid shipped configs %s (%s)", str(path), why)
    return None


def parse(raw: bytes) -> tuple[dict | None, str]:
    """(validated document, "") or (None, why not). JSON only; never raises."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        validate(doc)
        return doc, ""
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return None, str(e)[:200]


def set_aside(path: Path, raw: bytes | None = None) -> Path | None:
    """Rename a bad cache file to ``<name>.bad-<time>-<pid>`` (under the file's lock,
    and only if it still holds the bad bytes that were read)."""
    from filelock import FileLock, Timeout

    dest = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            try:
                if raw is not None and path.read_bytes() != raw:
                    return None  # rewritten meanwhile by a writer
                os.replace(path, dest)
                return dest
            except FileNotFoundError:
                return None
    except (Timeout, OSError) as e:
        log.warning("posattn autotune: could not set aside %s (%s)", path, e)
        return None


# ---------------------------------------------------------------------------
# entries


def canon(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def key_items(key) -> tuple:
    """A kernel key's ((field, value), ...) in field order: the index's dict key.
    Equal to what a cache file's entry key reads back as (lists become tuples)."""
    d = getattr(key, "__dict__", None)
    if d is None:
        return tuple((k, _freeze(v)) for k, v in key_fields(key).items())
    return tuple(d.items())


def key_fields(key) -> dict:
    """A kernel key (frozen dataclass) as an ordered dict of JSON-able fields."""
    d = getattr(key, "__dict__", None)
    if d is None:
        import dataclasses

        d = {f.name: getattr(key, f.name) for f in dataclasses.fields(key)}
    return {k: _thaw(v) for k, v in d.items()}


def bucket_fields(fields: dict) -> list[str]:
    return [k for k in fields if k.endswith("_bucket")]


def entry_id(e: dict) -> tuple:
    return (e["op"], e["backend"], e["version"], tuple((k, _freeze(v)) for k, v in e["key"].items()))


def best_result(e: dict) -> dict | None:
    ok = [r for r in e["results"] if r["status"] == "ok"]
    return min(ok, key=lambda r: r["time_s"]) if ok else None


def default_result(e: dict) -> dict | None:
    d = canon(e.get("default", {}))
    for r in e["results"]:
        if canon(r["config"]) == d:
            return r
    return None


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """Union by entry id; within an entry, a config's newer result replaces the older."""
    out: dict[tuple, dict] = {}
    for e in old:
        out[entry_id(e)] = e
    for e in new:
        eid = entry_id(e)
        if eid not in out:
            out[eid] = e
            continue
        prev = out[eid]
        res = {canon(r["config"]): r for r in prev["results"]}
        for r in e["results"]:
            res[canon(r["config"])] = r
        merged = dict(e)
        merged["results"] = list(res.values())
        out[eid] = merged
    return list(out.values())


def new_doc(fingerprint: str, device: dict, versions: dict) -> dict:
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "header": {"fingerprint": fingerprint, "device": device, "versions": versions, "updated": now_iso()},
            "entries": []}


def write_entries(path: Path, header: dict, entries: list[dict]) -> None:
    """Merge ``entries`` into the file at ``path`` atomically.

    Under ``<path>.lock``: re-read (setting aside a bad file), merge, write a
    temporary file in the same folder, fsync, ``os.replace``. Concurrent
    writers keep each other's entries; a killed writer leaves the old file.
    """
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = None
        cur, _why = parse(raw) if raw is not None else (None, "")
        if cur is None and raw is not None:
            # bad file: move it aside (we hold the lock, so rename directly)
            dest = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
            os.replace(path, dest)
            log.warning("posattn autotune: %s was not a valid cache file; set aside as %s", path, dest)
        doc = cur or new_doc(header["fingerprint"], header.get("device", {}), header.get("versions", {}))
        doc["header"].update({k: v for k, v in header.items() if k != "updated"})
        doc["header"]["updated"] = now_iso()
        doc["entries"] = merge_entries(doc["entries"], entries)
        validate(doc)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# ---------------------------------------------------------------------------
# the lookup index of one device (all its layers)


@dataclass
class Hit:
    config: dict
    time_s: float
    layer: str
    exact: bool


@dataclass
class Index:
    """Best configs of one device's layers, ready for dict lookups.

    ``exact[(op, backend, version, key items)]`` -> Hit; ``near[(op, backend,
    version, non-bucket items)]`` -> [(bucket values, Hit)] for the nearest
    bucket; ``backends[(op, key items)]`` -> {backend: (version, Hit)} and the
    same by non-bucket items for the backend choice.
    """

    exact: dict = field(default_factory=dict)
    near: dict = field(default_factory=dict)
    backends_exact: dict = field(default_factory=dict)
    backends_near: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # [(layer, path, n entries)]

    def add(self, layer: str, doc: dict) -> None:
        for e in doc["entries"]:
            best = best_result(e)
            if best is None:
                continue
            hit = Hit(dict(best["config"]), float(best["time_s"]), layer, True)
            items = tuple((k, _freeze(v)) for k, v in e["key"].items())
            bf = set(e.get("bucket_fields", []))
            rest = tuple(kv for kv in items if kv[0] not in bf)
            bvals = tuple(kv for kv in items if kv[0] in bf)
            ek = (e["op"], e["backend"], e["version"], items)
            if ek in self.exact:
                continue  # an earlier layer has it
            self.exact[ek] = hit
            self.near.setdefault((e["op"], e["backend"], e["version"], rest), []).append((bvals, hit))
            self.backends_exact.setdefault((e["op"], items), {}).setdefault(e["backend"], []).append((e["version"], hit))
            self.backends_near.setdefault((e["op"], rest), {}).setdefault(bvals, {}) \
                .setdefault(e["backend"], []).append((e["version"], hit))

    def config(self, op: str, backend: str, version: int, key) -> Hit | None:
        items = key_items(key)
        hit = self.exact.get((op, backend, version, items))
        if hit is not None:
            return hit
        bf = {k for k, _ in items if k.endswith("_bucket")}
        if not bf:
            return None
        rest = tuple(kv for kv in items if kv[0] not in bf)
        cands = self.near.get((op, backend, version, rest))
        if not cands:
            return None
        want = tuple(kv for kv in items if kv[0] in bf)
        bvals, hit = min(cands, key=lambda c: _bucket_distance(c[0], want))
        return Hit(hit.config, hit.time_s, hit.layer, False)

    def backend(self, op: str, key, versions: dict[str, int]) -> tuple[str, Hit] | None:
        """The fastest tuned backend among ``versions`` (backend -> current kernel version)."""
        items = key_items(key)
        per = self.backends_exact.get((op, items))
        if per is None:
            bf = {k for k, _ in items if k.endswith("_bucket")}
            rest = tuple(kv for kv in items if kv[0] not in bf)
            by_bucket = self.backends_near.get((op, rest))
            if not by_bucket:
                return None
            want = tuple(kv for kv in items if kv[0] in bf)
            # nearest bucket that has a current-version result for some backend
            usable = {b: p for b, p in by_bucket.items()
                      if any(v == versions.get(be) for be, lst in p.items() for v, _ in lst)}
            if not usable:
                return None
            per = usable[min(usable, key=lambda b: _bucket_distance(b, want))]
        best = None
        for be, lst in per.items():
            for v, hit in lst:
                if versions.get(be) == v and (best is None or hit.time_s < best[1].time_s):
                    best = (be, hit)
        return best


def _bucket_distance(have: tuple, want: tuple) -> tuple:
    """Sum of |log2| distances over the bucket fields; ties go to the larger bucket."""
    hd, wd = dict(have), dict(want)
    dist = 0.0
    size = 0.0
    for k, w in wd.items():
        h = hd.get(k)
        if not isinstance(h, int) or not isinstance(w, int) or h < 1 or w < 1:
            return (math.inf, 0.0)
        dist += abs(math.log2(h) - math.log2(w))
        size += math.log2(h)
    return (dist, -size)


def load_index(fingerprint: str, slug: str) -> Index:
    idx = Index()
    for layer, path, writable in layer_paths(fingerprint, slug):
        doc = read_file(path, writable=writable)
        if doc is not None:
            idx.add(layer, doc)
            idx.layers.append((layer, str(path), len(doc["entries"])))
    return idx

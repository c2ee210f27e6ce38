"""On-disk cache of NVRTC-compiled cubins (posattn/kernels/cuda_jit.py).

One file per (source file, architecture): the key hashes the CUDA sources (every file
under csrc/include/posattn and csrc/cuda, since any of them may be included), the
architecture, the NVRTC version, the compile options and the kernel name expressions.
An entry is `MAGIC | u32 header length | JSON header | cubin | sha256 of all before`;
it is written to a temporary file and renamed into place under a file lock (as the tune
cache), so a reader sees a whole entry or none. An entry that fails its checksum or does
not parse is renamed to `<name>.corrupt-<time>` (kept for inspection) and compiled again.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path

MAGIC = b"POSATTN-CUBIN-1\n"


def cache_dir() -> Path:
    """POSATTN_JIT_CACHE, else the platform user cache (platformdirs) / posattn / cuda-jit."""
    env = os.environ.get("POSATTN_JIT_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("posattn")) / "cuda-jit"


def entry_key(source_hash: str, source: str, arch: str, nvrtc_version: tuple, options: tuple,
              names: tuple) -> str:
    h = hashlib.sha256()
    for part in (source_hash, source, arch, ".".join(map(str, nvrtc_version)), "\0".join(options),
                 "\0".join(names)):
        h.update(part.encode())
        h.update(b"\1")
    return f"{Path(source).stem}-{arch}-{h.hexdigest()[:24]}"


def encode(header: dict, cubin: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + cubin
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes) -> tuple[dict, bytes]:
    """(header, cubin); ValueError when the entry is truncated, altered or not an entry."""
    if len(blob) < len(MAGIC) + 4 + 32 or not blob.startswith(MAGIC):
        raise ValueError("not a posattn cubin cache entry")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(body):
        raise ValueError("header length past the end")
    header = json.loads(body[start:start + n])
    return header, body[start + n:]


def _lock(path: Path):
    import filelock

    return filelock.FileLock(str(path) + ".lock", timeout=600)


def set_aside(path: Path) -> Path:
    dest = path.with_name(f"{path.name}.corrupt-{time.time_ns()}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        pass
    return dest


def load_or_build(key: str, build, directory: Path | None = None) -> tuple[dict, bytes, str]:
    """(header, cubin, how) for `key`: how is "hit" (read from disk), "miss" (built by
    `build() -> (header, cubin)` and stored) or "corrupt" (an unreadable entry set aside,
    then built). Concurrent callers of one key build it once: the lock is held while building."""
    d = directory or cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{key}.cubin"

    def read():
        try:
            return decode(path.read_bytes())
        except FileNotFoundError:
            return None

    try:  # fast path, no lock: entries are only ever renamed into place whole
        got = read()
        if got is not None:
            return got[0], got[1], "hit"
    except ValueError:
        pass
    with _lock(path):
        how = "miss"
        try:
            got = read()
            if got is not None:
                return got[0], got[1], "hit"
        except ValueError:
            set_aside(path)
            how = "corrupt"
        header, cubin = build()
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(header, cubin))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return header, cubin, how

"""The NVRTC provider on CPU: every catalogued CUDA kernel compiles for sm_80, sm_90a and
sm_100a and its cubin carries the kernel symbols (cuobjdump, shipped with triton), and the
on-disk cubin cache (hit, miss on a source change, concurrent writers, a corrupt entry).
Launching needs a GPU: benchmarks/gpu_check.sh."""
import shutil
import threading
import time

import pytest

cuda_jit = pytest.importorskip("posattn.kernels.cuda_jit")
from posattn.kernels import cuda_jit_cache  # noqa: E402
from posattn.kernels.cuda_jit_catalogue import CATALOGUE  # noqa: E402


def _nvrtc_or_skip():
    ok, why = cuda_jit.status()
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    _nvrtc_or_skip()
    if cuda_jit.cuobjdump() is None:
        pytest.skip("no cuobjdump (triton ships one)")
    d = tmp_path_factory.mktemp("jit")
    return cuda_jit.compile_all(("sm_80", "sm_90a", "sm_100a"), d)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100a"])
def test_every_kernel_compiles_with_its_symbol(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert sorted(r["source"] for r in rows) == sorted(CATALOGUE)
    for r in rows:
        usage = cuda_jit.resource_usage(r["cubin"])
        assert set(r["names"]) == set(CATALOGUE[r["source"]])
        for expr, mangled in r["names"].items():
            assert mangled in usage, f"{expr} ({mangled}) missing from the {arch} cubin of {r['source']}"
            assert usage[mangled]["registers"] > 0
        # nothing else was emitted (no stray kernels, no lost instantiation)
        assert set(usage) == set(r["names"].values())


def test_cubin_is_for_the_requested_arch(compiled):
    import subprocess
    import tempfile

    tool = cuda_jit.cuobjdump()
    for r in compiled:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(r["cubin"])
            f.flush()
            out = subprocess.run([tool, "--list-elf", f.name], capture_output=True, text=True).stdout
            out += subprocess.run([tool, "-elf", f.name], capture_output=True, text=True).stdout[:4000]
        assert r["arch"].rstrip("a") in out, (r["arch"], out[:500])


def test_bad_arch_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="arch"):
        cuda_jit.check_arch("compute_90")
    with pytest.raises(ValueError, match="sm_80 or newer"):
        cuda_jit.check_arch("sm_75")


def test_truncated_cubin_is_completed():
    # CuPy 14.2's getCUBIN drops the image's last byte; _elf_complete restores it
    _nvrtc_or_skip()
    header, blob = cuda_jit.compile_source("cache_cuda.cu", "sm_80")
    assert cuda_jit._elf_complete(blob[:-1]) == blob
    assert cuda_jit._elf_complete(blob) == blob


# ---------------------------------------------------------------------------
# the cache


def test_cache_miss_then_hit(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"names": {"k": "_Z1k"}}, b"\x7fELF-cubin"

    h1, c1, how1 = cuda_jit_cache.load_or_build("k-sm_80-aa", build, tmp_path)
    h2, c2, how2 = cuda_jit_cache.load_or_build("k-sm_80-aa", build, tmp_path)
    assert (how1, how2) == ("miss", "hit") and len(calls) == 1
    assert (h1, c1) == (h2, c2) == ({"names": {"k": "_Z1k"}}, b"\x7fELF-cubin")
    assert not list(tmp_path.glob("*.tmp"))


def test_key_changes_with_source_arch_nvrtc_options():
    base = dict(source_hash="a" * 64, source="rope_cuda.cu", arch="sm_90a", nvrtc_version=(13, 1),
                options=("-std=c++17",), names=("k<float>",))
    k0 = cuda_jit_cache.entry_key(**base)
    for field, value in (("source_hash", "b" * 64), ("arch", "sm_100a"), ("nvrtc_version", (13, 5)),
                         ("options", ("-std=c++20",)), ("names", ("k<double>",))):
        assert cuda_jit_cache.entry_key(**{**base, field: value}) != k0, field


def test_source_change_misses(tmp_path):
    _nvrtc_or_skip()
    root = tmp_path / "csrc"
    shutil.copytree(cuda_jit.source_root() / "include", root / "include")
    shutil.copytree(cuda_jit.source_root() / "cuda", root / "cuda")
    h0 = cuda_jit.source_hash(root)
    hdr = root / "include" / "posattn" / "common.h"
    hdr.write_text(hdr.read_text() + "\n// changed\n")
    assert cuda_jit.source_hash(root) != h0


def test_concurrent_writers_build_once(tmp_path):
    calls = []
    results = []

    def build():
        calls.append(1)
        time.sleep(0.2)
        return {"names": {}}, b"cubin-bytes"

    def worker():
        results.append(cuda_jit_cache.load_or_build("same-key", build, tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r[2] for r in results) == ["hit"] * 5 + ["miss"]
    assert all(r[1] == b"cubin-bytes" for r in results)


def test_concurrent_processes_build_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        hows = pool.starmap(_proc_build, [(str(tmp_path), i) for i in range(3)])
    assert sorted(hows) == ["hit", "hit", "miss"]
    assert len(list(tmp_path.glob("*.built"))) == 1


def _proc_build(d, i):
    from pathlib import Path

    def build():
        Path(d, f"{i}.built").write_text("x")
        time.sleep(0.5)
        return {"names": {}}, b"cubin"

    return cuda_jit_cache.load_or_build("proc-key", build, Path(d))[2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_entry_is_set_aside_and_rebuilt(tmp_path, damage):
    build = lambda: ({"names": {"a": "b"}}, b"\x00" * 100 + b"cubin")  # noqa: E731
    cuda_jit_cache.load_or_build("key", build, tmp_path)
    path = tmp_path / "key.cubin"
    blob = path.read_bytes()
    bad = {"truncate": blob[:-5], "flip": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:],
           "garbage": b"not a cache entry"}[damage]
    path.write_bytes(bad)
    header, cubin, how = cuda_jit_cache.load_or_build("key", build, tmp_path)
    assert how == "corrupt" and cubin == b"\x00" * 100 + b"cubin"
    aside = list(tmp_path.glob("key.cubin.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    assert cuda_jit_cache.load_or_build("key", build, tmp_path)[2] == "hit"


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POSATTN_JIT_CACHE", str(tmp_path / "c"))
    assert cuda_jit_cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("POSATTN_JIT_CACHE")
    assert "posattn" in str(cuda_jit_cache.cache_dir())

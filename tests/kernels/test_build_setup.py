"""setup.py's choice of a CUDA toolkit (imported, not run: setup() runs only as __main__)."""
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup_mod(monkeypatch):
    spec = importlib.util.spec_from_file_location("posattn_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; does not build
    for var in ("CUDA_HOME", "CUDA_PATH", "POSATTN_CUDA"):
        monkeypatch.delenv(var, raising=False)
    return mod


def _fake_nvcc(tmp_path):
    """A toolkit folder with bin/nvcc but no include/cuda_runtime.h (a runtime-only image)."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    return home, nvcc


def test_auto_falls_back_to_cpu_only_when_nvcc_has_no_headers(setup_mod, tmp_path, monkeypatch, capsys):
    home, nvcc = _fake_nvcc(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(setup_mod, "DEFAULT_CUDA_HOME", str(tmp_path / "nowhere"))
    assert setup_mod.find_nvcc() == str(nvcc)
    assert setup_mod.cuda_toolkit() is None  # no SystemExit
    err = capsys.readouterr().err
    assert "warning" in err and "cuda_runtime.h" in err and "without posattn._cuda" in err
    # the CPU module is still built, and the NVRTC provider's host module (no CUDA needed),
    # so that the CUDA kernels still run on a GPU machine with CuPy (issue 16)
    names = [e.name for e in setup_mod.extensions()]
    assert names == ["posattn._C", "posattn._cuda_jit_host"]


def test_forced_cuda_without_headers_stops(setup_mod, tmp_path, monkeypatch):
    home, _ = _fake_nvcc(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("POSATTN_CUDA", "1")
    monkeypatch.setattr(setup_mod, "DEFAULT_CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="cuda_runtime.h"):
        setup_mod.cuda_toolkit()


def test_toolkit_with_headers_is_used(setup_mod, tmp_path, monkeypatch):
    home, nvcc = _fake_nvcc(tmp_path)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_mod.cuda_toolkit() == (str(nvcc), home)
    monkeypatch.setenv("POSATTN_CUDA", "0")
    assert setup_mod.cuda_toolkit() is None


def test_makefile_rebuilds_on_included_bodies():
    """Editing csrc/cpu/*_impl.inc (or a .cuh) must rebuild the modules: make's CSRC lists them."""
    text = (ROOT / "Makefile").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("CSRC"))
    for pattern in ("'*.h'", "'*.cpp'", "'*.cu'", "'*.inc'", "'*.cuh'"):
        assert pattern in line, (pattern, line)
    # and make bench runs the host-overhead targets with the assert on (not make test)
    bench = text[text.index("\nbench:"):].split("\n\n")[0]
    assert "POSATTN_BENCH_ASSERT=1" in bench and "test_bench_overhead.py" in bench
    test = text[text.index("\ntest:"):].split("\n\n")[0]
    assert "BENCH_ASSERT" not in test and "benchmarks" not in test
    assert os.path.exists(ROOT / "benchmarks" / "test_bench_overhead.py")

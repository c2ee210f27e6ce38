"""posattn._cuda: built with nvcc, imports without a GPU, and a launch without a
device raises the documented RuntimeError (numerics run on a GPU in tests/rope)."""
import pytest
import torch

from posattn.kernels import cuda as ck
from posattn.kernels import native


def _mod():
    if not ck.built():
        pytest.skip("posattn._cuda is not built here (no nvcc, or POSATTN_CUDA=0)")
    return ck.module()


def test_imports_and_reports_runtime():
    m = _mod()
    assert m.runtime_version() >= 11000
    assert m.device_count() >= 0


def test_launch_without_device_raises_runtime_error():
    m = _mod()
    if m.device_count() > 0:
        pytest.skip("a CUDA device is visible")
    q = torch.zeros(1, 2, 1, 64)
    inv = torch.ones(32)
    pos = torch.zeros(1, 1, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        m.rope_forward(native.rope_tensor_args(q, q), [], [1, 2, 64, 64, 0, 0], native.pos_args(pos),
                       [inv.data_ptr(), 1, 0, 0, 0], 1.0, [], 1.0, 0, 128, 0)


def test_backend_reports_why_unusable():
    _mod()
    ok, why = ck.status()
    if torch.cuda.is_available() and ok:
        pytest.skip("cuda backend usable here")
    assert not ok and why


def test_bad_arguments_are_rejected_before_launch():
    m = _mod()
    q = torch.zeros(1, 2, 1, 64)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        m.rope_forward(native.rope_tensor_args(q, q), [], [1, 2, 64, 63, 0, 0], [0, 0, 0, 0, 0],
                       [0, 1, 0, 0, 0], 1.0, [], 1.0, 0, 128, 0)


def test_module_carries_sm80_sm90a_code_and_ptx():
    import os
    import shutil
    import subprocess

    m = _mod()
    try:
        import triton

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:  # pragma: no cover
        tool = ""
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        pytest.skip("cuobjdump not found")
    elf = subprocess.run([tool, "--list-elf", m.__file__], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", m.__file__], capture_output=True, text=True).stdout
    assert "sm_80" in elf and "sm_90a" in elf, elf
    assert "sm_90" in ptx, ptx


def test_driver_older_than_the_runtime_is_named(monkeypatch):
    """A module built with CUDA 13.0 on a driver that supports 12.4: the status says so, with
    both versions, instead of "no CUDA device is visible" (probe monkeypatched; no GPU needed)."""
    monkeypatch.setattr(ck, "_cuda", object())  # "built"
    monkeypatch.setattr(ck, "probe", lambda: {"count": 0, "driver": 12040, "runtime": 13000,
                                               "problem": "", "torch": False})
    ok, why = ck.status()
    assert not ok
    assert "CUDA 13.0" in why and "CUDA 12.4" in why and "12040" in why and "13000" in why
    assert "update the driver" in why and "no CUDA device is visible" not in why
    # a new enough driver without a device is "no device"; none at all says so
    monkeypatch.setattr(ck, "probe", lambda: {"count": 0, "driver": 13000, "runtime": 13000, "problem": "",
                                               "torch": False})
    assert "no CUDA device is visible" in ck.status()[1]
    # same major version, older minor: compatible, so not blamed on the driver without the runtime's verdict
    monkeypatch.setattr(ck, "probe", lambda: {"count": 0, "driver": 13000, "runtime": 13010, "problem": "",
                                               "torch": False})
    assert "no CUDA device is visible" in ck.status()[1] and "13.0" in ck.status()[1]
    insufficient = "CUDA driver version is insufficient for CUDA runtime version"
    monkeypatch.setattr(ck, "probe", lambda: {"count": 0, "driver": 13000, "runtime": 13010, "torch": False,
                                               "problem": insufficient})
    assert "update the driver" in ck.status()[1]
    monkeypatch.setattr(ck, "probe", lambda: {"count": 0, "driver": 0, "runtime": 13000, "problem": "",
                                               "torch": False})
    assert "no CUDA driver is installed" in ck.status()[1]
    monkeypatch.setattr(ck, "probe", lambda: {"count": 1, "driver": 13000, "runtime": 13000, "problem": "",
                                               "torch": True})
    assert ck.status() == (True, "")


def test_module_reports_driver_and_its_diagnosis():
    m = _mod()
    assert m.driver_version() >= 0
    if m.device_count() == 0:
        why = m.device_problem()
        assert why  # says why no device is usable
        if m.driver_version() == 0:
            assert "no CUDA driver" in why

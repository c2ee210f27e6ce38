"""Test set-up. Without a CUDA device, Triton kernels run in the interpreter on
CPU tensors: TRITON_INTERPRET must be set before any kernel module is imported."""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests never read or write the user's tuned-config cache (a `posattn tune` run on
# this machine must not change which config a test runs): a private cache home.
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="posattn-tests-cache-")
os.environ.pop("POSATTN_TUNE_DIR", None)

import pytest  # noqa: E402
import torch  # noqa: E402

import posattn  # noqa: E402,F401

DEVICE = "cuda" if _has_cuda() else "cpu"


@pytest.fixture
def device():
    return DEVICE


def usable_backends(op: str, device_type: str = DEVICE) -> list[str]:
    """Backends of ``op`` that can run on ``device_type`` tensors in this process."""
    from posattn import dispatch
    from posattn.kernels import triton as tk

    out = []
    for name in dispatch.kernels(op):
        ok, _ = dispatch.backend_status(name)
        if not ok:
            continue
        if name == "cpu" and device_type != "cpu":
            continue
        if name == "cuda" and device_type != "cuda":
            continue
        if name == "triton" and not tk.device_ok(device_type):
            continue
        out.append(name)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

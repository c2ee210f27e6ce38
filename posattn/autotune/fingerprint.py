"""Device fingerprints: which cache file a device reads and writes.

The device itself is probed and named in :mod:`posattn.device` (shared with
the benchmark harness). A GPU's fingerprint is
``<name slug>-cc<major><minor>-sm<count>`` (e.g. ``nvidia-h200-cc90-sm132``);
a CPU's is ``cpu-<model slug>-c<cores>``. The slug alone (``nvidia-h200``)
names the configs shipped in the package. The library versions go into the
cache file's header, not into the file name: a new torch or triton keeps the
measurements (they are re-checked against the reference when re-tuned), a
new kernel version does not (entries carry the kernel's version).
"""
from __future__ import annotations

from posattn.device import Device, cpu_device, cuda_device, device_for, name_slug as slugify

__all__ = ["Device", "cpu_device", "cuda_device", "device_for", "slugify", "versions"]


def versions(device: Device) -> dict:
    """Library versions recorded in a cache file's header."""
    import torch

    from posattn._version import __version__

    out = {"posattn": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is a Linux dependency
        pass
    return out

"""Device fingerprints: which cache file a device reads and writes.

A GPU's fingerprint is ``<name slug>-cc<major><minor>-sm<count>`` (e.g.
``nvidia-h200-cc90-sm132``); a CPU's is ``cpu-<model slug>-c<cores>``. The
slug alone (``nvidia-h200``) names the configs shipped in the package. The
library versions go into the cache file's header, not into the file name:
a new torch or triton keeps the measurements (they are re-checked against
the reference when re-tuned), a new kernel version does not (entries carry
the kernel's version).
"""
from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    kind: str            # "cuda" or "cpu"
    name: str            # human name: "NVIDIA H200", "AMD EPYC 7B13"
    slug: str            # "nvidia-h200": names the shipped configs file
    fingerprint: str     # slug + capability + SM count (or cores): names the user cache file
    capability: str | None = None  # "9.0"
    sm_count: int | None = None
    cores: int | None = None
    l2_bytes: int | None = None    # the cache the tuner's rotated inputs must exceed


def slugify(name: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", " ", name.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:64] or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_llc_bytes() -> int:
    """Largest CPU cache level in bytes (the rotation target on a CPU)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size"), encoding="ascii") as f:
                    txt = f.read().strip().upper()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", txt)
            if m:
                mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or (32 << 20)


@functools.lru_cache(maxsize=None)
def cpu_device() -> Device:
    model = _cpu_model()
    cores = _cpu_cores()
    slug = "cpu-" + slugify(model)
    return Device("cpu", model, slug, f"{slug}-c{cores}", cores=cores, l2_bytes=_cpu_llc_bytes())


@functools.lru_cache(maxsize=None)
def cuda_device(index: int) -> Device:
    import torch

    p = torch.cuda.get_device_properties(index)
    slug = slugify(p.name)
    cc = f"{p.major}.{p.minor}"
    fp = f"{slug}-cc{p.major}{p.minor}-sm{p.multi_processor_count}"
    return Device("cuda", p.name, slug, fp, capability=cc, sm_count=p.multi_processor_count,
                  l2_bytes=int(getattr(p, "L2_cache_size", 0) or (50 << 20)))


def device_for(device_type: str, index: int | None = None) -> Device:
    """The Device behind a kernel key's ``device_type`` (the current CUDA device by default)."""
    if device_type == "cuda":
        import torch

        return cuda_device(torch.cuda.current_device() if index is None else index)
    return cpu_device()


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

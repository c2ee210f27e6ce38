"""What machine this is: the one place that probes and names a device.

Both the tuner (``posattn.autotune``: which cache file a device reads and
writes) and the benchmark harness (``posattn.bench``: which device a result
row was measured on) describe the device from the :class:`Device` built here,
so the two can never disagree about a name, a capability or a core count.
This module imports nothing from posattn; every layer may use it.

Identifiers built from it:

* ``Device.slug`` (``nvidia-h200``, ``cpu-amd-epyc-7b13``): names the tuned
  configs shipped in the package;
* ``Device.fingerprint`` (``nvidia-h200-cc90-sm132``,
  ``cpu-amd-epyc-7b13-c16``): names the user's tune cache file;
* the benchmark harness's result-folder slug (``h200``) is derived from
  ``Device.name`` in ``posattn.bench.device``.
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
    cores: int | None = None       # CPU: cores this process may run on (its affinity mask)
    l2_bytes: int | None = None    # GPU: L2 size; CPU: largest cache level (what rotated inputs must exceed)
    memory_bytes: int | None = None  # GPU: device memory
    logical_cpus: int | None = None  # CPU: os.cpu_count(), the whole machine's logical CPUs


def slugify(text: str) -> str:
    """Lower-case ``text`` with every run of other characters turned into one dash."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def name_slug(name: str) -> str:
    """A device name's slug without marketing marks, clock or the word "cpu" (at most 64 chars)."""
    return slugify(re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$", " ", name.lower()))[:64]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_llc_bytes() -> int:
    """Largest CPU cache level in bytes (32 MiB when the system does not say)."""
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
    model = cpu_model()
    cores = cpu_cores()
    slug = "cpu-" + name_slug(model)
    return Device("cpu", model, slug, f"{slug}-c{cores}", cores=cores, l2_bytes=cpu_llc_bytes(),
                  logical_cpus=os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def cuda_device(index: int) -> Device:
    import torch

    p = torch.cuda.get_device_properties(index)
    slug = name_slug(p.name)
    fp = f"{slug}-cc{p.major}{p.minor}-sm{p.multi_processor_count}"
    return Device("cuda", p.name, slug, fp, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                  l2_bytes=int(getattr(p, "L2_cache_size", 0) or 0) or None, memory_bytes=int(p.total_memory))


def device_for(device_type: str, index: int | None = None) -> Device:
    """The Device behind a kernel key's ``device_type`` (the current CUDA device by default)."""
    if device_type == "cuda":
        import torch

        return cuda_device(torch.cuda.current_device() if index is None else index)
    return cpu_device()

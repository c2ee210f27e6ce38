"""Which machine a result came from, and what its ceiling is.

``device_fingerprint()`` describes the device a run measured (GPU: name
slug, compute capability, SM count, memory, L2; CPU: model name and core
count), from the probe in :mod:`posattn.device` that the tuner shares.
``peaks()`` gives the roofline ceilings: for a known GPU the vendor datasheet's peak memory bandwidth and dense bf16/fp16
tensor FLOP/s; on a CPU (or an unknown GPU) the bandwidth of a large copy
and the FLOP/s of a matrix product, measured in the same run.
``remeasure()`` measures such a ceiling again when a kernel exceeds it.
"""
from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass

from posattn import device as _device
from posattn.device import slugify

# --------------------------------------------------------------------------
# Datasheet peaks. bandwidth: GB/s (1e9 B/s) of the device memory; tflops:
# dense (no structured sparsity) bf16/fp16 tensor-core TFLOP/s. Datasheets
# print the sparse figure for Hopper/Ada/Ampere; dense is half of it.
# fp32 work is held against the same tensor-core figure (a conservative
# ceiling: every op measured here so far is bound by bandwidth, not FLOP/s).


@dataclass(frozen=True)
class GpuPeak:
    label: str
    bandwidth_gbs: float
    tflops_bf16: float
    source: str


# Order matters: the first pattern that matches the lower-cased device name wins.
GPU_PEAKS: list[tuple[str, GpuPeak]] = [
    # NVIDIA H200 Tensor Core GPU datasheet (2024): H200 SXM 4.8 TB/s HBM3e,
    # BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity; H200 NVL 4.8 TB/s, 1,671 with sparsity.
    (r"h200.*nvl", GpuPeak("H200 NVL", 4800.0, 835.5, "NVIDIA H200 datasheet: 4.8 TB/s, 1,671 TFLOPS bf16 sparse")),
    (r"h200", GpuPeak("H200 SXM", 4800.0, 989.5, "NVIDIA H200 datasheet: 4.8 TB/s, 1,979 TFLOPS bf16 sparse")),
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 3.35 TB/s, BF16 1,979 TFLOPS sparse;
    # PCIe 2 TB/s, 1,513 sparse; NVL 3.9 TB/s, 1,671 sparse.
    (r"h100.*nvl", GpuPeak("H100 NVL", 3900.0, 835.5, "NVIDIA H100 datasheet: 3.9 TB/s, 1,671 TFLOPS bf16 sparse")),
    (r"h100.*pcie", GpuPeak("H100 PCIe", 2000.0, 756.5, "NVIDIA H100 datasheet: 2 TB/s, 1,513 TFLOPS bf16 sparse")),
    (r"h100", GpuPeak("H100 SXM", 3350.0, 989.5, "NVIDIA H100 datasheet: 3.35 TB/s, 1,979 TFLOPS bf16 sparse")),
    # NVIDIA HGX B200 specifications: 8 TB/s per GPU, FP16/BF16 4.5 PFLOPS sparse per GPU.
    (r"b200", GpuPeak("B200", 8000.0, 2250.0, "NVIDIA HGX B200 spec: 8 TB/s, 4.5 PFLOPS bf16 sparse per GPU")),
    # NVIDIA A100 Tensor Core GPU datasheet: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s,
    # 40GB 1,555 GB/s; BF16 Tensor Core 312 TFLOPS dense (624 sparse).
    (r"a100.*80gb.*pcie|a100.*pcie.*80gb",
     GpuPeak("A100 80GB PCIe", 1935.0, 312.0, "NVIDIA A100 datasheet: 1,935 GB/s, 312 TFLOPS bf16")),
    (r"a100.*80gb", GpuPeak("A100 80GB SXM", 2039.0, 312.0, "NVIDIA A100 datasheet: 2,039 GB/s, 312 TFLOPS bf16")),
    (r"a100", GpuPeak("A100 40GB", 1555.0, 312.0, "NVIDIA A100 datasheet: 1,555 GB/s, 312 TFLOPS bf16")),
    # NVIDIA L40S datasheet: 864 GB/s GDDR6, BF16 Tensor Core 362.05 TFLOPS dense (733 sparse).
    (r"l40s", GpuPeak("L40S", 864.0, 362.05, "NVIDIA L40S datasheet: 864 GB/s, 362.05 TFLOPS bf16 dense")),
    # NVIDIA L40 datasheet: 864 GB/s, BF16 Tensor Core 181.05 TFLOPS dense (362.1 sparse).
    (r"\bl40\b", GpuPeak("L40", 864.0, 181.05, "NVIDIA L40 datasheet: 864 GB/s, 181.05 TFLOPS bf16 dense")),
    # NVIDIA L4 datasheet: 300 GB/s, BF16 Tensor 242 TFLOPS sparse.
    (r"\bl4\b", GpuPeak("L4", 300.0, 121.0, "NVIDIA L4 datasheet: 300 GB/s, 242 TFLOPS bf16 sparse")),
    # NVIDIA A10 datasheet: 600 GB/s, BF16 Tensor 250 TFLOPS sparse.
    (r"\ba10\b", GpuPeak("A10", 600.0, 125.0, "NVIDIA A10 datasheet: 600 GB/s, 250 TFLOPS bf16 sparse")),
    # NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 1,008 GB/s GDDR6X;
    # FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense.
    (r"rtx 4090",
     GpuPeak("RTX 4090", 1008.0, 165.2, "NVIDIA Ada whitepaper: 1,008 GB/s, 165.2 TFLOPS bf16 (fp32 acc.)")),
    # NVIDIA Ampere GA102 whitepaper: RTX 3090 936 GB/s; FP16 tensor with FP32 accumulate 71 TFLOPS dense.
    (r"rtx 3090", GpuPeak("RTX 3090", 936.0, 71.0, "NVIDIA GA102 whitepaper: 936 GB/s, 71 TFLOPS fp16 (fp32 acc.)")),
]


def gpu_peak(name: str) -> GpuPeak | None:
    """The datasheet entry for a CUDA device name (torch.cuda.get_device_name), or None."""
    low = name.lower()
    for pat, peak in GPU_PEAKS:
        if re.search(pat, low):
            return peak
    return None


def device_fingerprint(device: str | None = None) -> dict:
    """What device a result was measured on (a result row's ``device`` field).

    GPU: {"kind": "cuda", "name", "slug", "cc", "sm_count", "memory_gb", "l2_mb", "cuda"}.
    CPU: {"kind": "cpu", "name" (model), "slug", "cores", "threads", "machine"}.
    The slug names the folder of committed results (benchmarks/results/<slug>/):
    the GPU name without "NVIDIA" (``h200``), or ``cpu-<model>-<logical CPUs>c``.
    The device is probed by :mod:`posattn.device`, as the tuner's is.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda":
        dev = _device.cuda_device(d.index or 0)
        return {"kind": "cuda", "name": dev.name, "slug": slugify(dev.name.replace("NVIDIA", "")),
                "cc": dev.capability, "sm_count": dev.sm_count,
                "memory_gb": round((dev.memory_bytes or 0) / 2**30, 1),
                "l2_mb": round((dev.l2_bytes or 0) / 2**20, 1),
                "cuda": torch.version.cuda}
    dev = _device.cpu_device()
    return {"kind": "cpu", "name": dev.name, "slug": slugify(f"cpu {dev.name} {dev.logical_cpus}c"),
            "cores": dev.logical_cpus, "threads": torch.get_num_threads(), "machine": platform.machine()}


# --------------------------------------------------------------------------
# measured ceilings

def _best_seconds(fn, dev, reps: int) -> float:
    """Fastest of ``reps`` runs of ``fn`` after one warm-up (CUDA events on a GPU)."""
    import torch

    best = float("inf")
    for _ in range(reps + 1):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            t = s.elapsed_time(e) * 1e-3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        best = min(best, t)
    return best


def measure_copy_bandwidth(device: str, nbytes: int | None = None, reps: int = 10) -> float:
    """GB/s of a large device copy (bytes read + bytes written), best of ``reps``."""
    import torch

    dev = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    best = _best_seconds(lambda: b.copy_(a), dev, reps)
    del a, b
    return 2 * n * 4 / best / 1e9


def measure_matmul_tflops(device: str, reps: int = 3) -> float:
    """TFLOP/s of a square matrix product (bf16 on a GPU, fp32 on a CPU), best of ``reps``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = _best_seconds(lambda: a @ b, dev, reps)
    return 2 * n ** 3 / best / 1e12


_measured: dict = {}


def peaks(fingerprint: dict, device: str, measure: bool = True) -> dict:
    """The roofline ceilings for this run.

    Returns {"bandwidth_gbs", "tflops", "ceiling", "source", "measured_copy_gbs",
    "measured_matmul_tflops"}: ``bandwidth_gbs``/``tflops`` are what % of roofline is
    computed against; ``ceiling`` says where they come from: "datasheet" (a known GPU)
    or "measured" (anything else; :func:`remeasure` can raise it).
    """
    out: dict = {}
    if measure:
        key = str(device)
        if key not in _measured:  # once per process and device
            _measured[key] = {"measured_copy_gbs": round(measure_copy_bandwidth(device), 1),
                              "measured_matmul_tflops": round(measure_matmul_tflops(device), 3)}
        out.update(_measured[key])
    known = gpu_peak(fingerprint.get("name", "")) if fingerprint.get("kind") == "cuda" else None
    if known is not None:
        out.update(bandwidth_gbs=known.bandwidth_gbs, tflops=known.tflops_bf16, ceiling="datasheet",
                   source=f"datasheet ({known.label}): {known.source}")
    elif measure:
        out.update(bandwidth_gbs=out["measured_copy_gbs"], tflops=out["measured_matmul_tflops"],
                   ceiling="measured", remeasured=0, source=_MEASURED_SOURCE)
    return out


_MEASURED_SOURCE = "measured in this run: large copy (read+write bytes) and a matrix product"


def remeasure(peaks: dict, device: str, attempts: int = 3, fits=None) -> dict:
    """Measure a measured ceiling again, keeping the best figures seen.

    A kernel above 100 % of a measured ceiling means the ceiling was measured
    too low (the machine was busier during the copy than during the kernel);
    it is never the kernel beating the machine. Each attempt measures the copy
    bandwidth and the matrix product again; the new ceiling is the best of the
    old and new figures. ``fits(new_peaks)`` (optional) stops the attempts as
    soon as it returns True. A datasheet ceiling (a known GPU) cannot be
    measured again: it is returned unchanged.

    Returns a new dict (``peaks`` is not changed), with ``remeasured`` counting
    the attempts made over the run.
    """
    if peaks.get("ceiling") != "measured":
        return peaks
    new = dict(peaks)
    for _ in range(max(1, attempts)):
        bw = round(measure_copy_bandwidth(device), 1)
        tf = round(measure_matmul_tflops(device), 3)
        new["measured_copy_gbs"] = max(new.get("measured_copy_gbs") or 0.0, bw)
        new["measured_matmul_tflops"] = max(new.get("measured_matmul_tflops") or 0.0, tf)
        new.update(bandwidth_gbs=new["measured_copy_gbs"], tflops=new["measured_matmul_tflops"],
                   remeasured=int(new.get("remeasured") or 0) + 1,
                   source=_MEASURED_SOURCE + "; best of the first measurement and "
                   "re-measurements after a kernel exceeded it")
        if fits is not None and fits(new):
            break
    _measured[str(device)] = {"measured_copy_gbs": new["measured_copy_gbs"],
                              "measured_matmul_tflops": new["measured_matmul_tflops"]}
    return new

"""Device fingerprint and the roofline table."""
import pytest

from posattn.bench import device


@pytest.mark.parametrize("name,label,bw", [
    ("NVIDIA H200", "H200 SXM", 4800.0),
    ("NVIDIA H200 NVL", "H200 NVL", 4800.0),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2000.0),
    ("NVIDIA H100 NVL", "H100 NVL", 3900.0),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2039.0),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935.0),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555.0),
    ("NVIDIA L40S", "L40S", 864.0),
    ("NVIDIA L40", "L40", 864.0),
    ("NVIDIA L4", "L4", 300.0),
    ("NVIDIA A10", "A10", 600.0),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 1008.0),
])
def test_known_gpus(name, label, bw):
    p = device.gpu_peak(name)
    assert p is not None and p.label == label and p.bandwidth_gbs == bw
    assert p.tflops_bf16 > 0
    assert any(w in p.source.lower() for w in ("datasheet", "whitepaper", "spec"))


def test_unknown_gpu_has_no_datasheet_entry():
    assert device.gpu_peak("Some Future GPU 9000") is None


def test_cpu_fingerprint():
    fp = device.device_fingerprint("cpu")
    assert fp["kind"] == "cpu" and fp["name"] and fp["cores"] >= 1 and fp["threads"] >= 1
    assert fp["slug"] == device.slugify(fp["slug"]) and fp["slug"].startswith("cpu-")


def test_slugify():
    assert device.slugify(" NVIDIA H100 80GB HBM3 ".replace("NVIDIA", "")) == "h100-80gb-hbm3"
    assert device.slugify("!!!") == "unknown"


def test_cpu_peaks_are_measured():
    p = device.peaks(device.device_fingerprint("cpu"), "cpu", measure=True)
    assert p["bandwidth_gbs"] == p["measured_copy_gbs"] > 0
    assert p["tflops"] > 0 and "measured" in p["source"]


def test_copy_bandwidth_counts_read_and_write():
    bw = device.measure_copy_bandwidth("cpu", nbytes=8 << 20, reps=2)
    assert 0.05 < bw < 5000


def test_bench_and_tuner_describe_the_same_cpu():
    from posattn.autotune import fingerprint as F

    fp, dev = device.device_fingerprint("cpu"), F.cpu_device()
    assert fp["name"] == dev.name and fp["cores"] == dev.logical_cpus
    assert dev.fingerprint == f"{dev.slug}-c{dev.cores}" and dev.slug.startswith("cpu-")


def test_gpu_fingerprint_formats(monkeypatch):
    """One probe, the two names it has always had: the result folder ``h200``
    and the tune cache file ``nvidia-h200-cc90-sm132``."""
    import types

    import torch

    from posattn import device as shared
    from posattn.autotune import fingerprint as F

    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                                  total_memory=141 * 2**30, L2_cache_size=60 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda idx: props)
    shared.cuda_device.cache_clear()
    try:
        fp, dev = device.device_fingerprint("cuda:0"), F.cuda_device(0)
    finally:
        shared.cuda_device.cache_clear()
    assert {k: fp[k] for k in ("kind", "name", "slug", "cc", "sm_count", "memory_gb", "l2_mb")} == {
        "kind": "cuda", "name": "NVIDIA H200", "slug": "h200", "cc": "9.0", "sm_count": 132,
        "memory_gb": 141.0, "l2_mb": 60.0}
    assert (dev.slug, dev.fingerprint, dev.l2_bytes) == ("nvidia-h200", "nvidia-h200-cc90-sm132", 60 * 2**20)

"""Backend choice: no unverified default on a GPU, decisions memoised per CUDA device,
and `verified_backends` (what `posattn info` reports). Runs on CPU: CUDA keys are
faked (backend_status and the current-device probe are monkeypatched)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest

from posattn import dispatch
from posattn.rope.cos_sin import CosSinKey

OP = "dispatchtest"


@dataclass(frozen=True)
class DKey:
    device_type: str = "cuda"
    dtype: str = "float32"


def _fn(*_args):
    return None


@dispatch.explicit_aware
def _triton_supports(key, explicit=False):
    if key.device_type == "cpu" and not explicit:
        return False, "interpreter only by name"
    return (False, "no float64") if key.dtype == "float64" else (True, "")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend usable; a test op with one kernel per backend; no tuned lookups;
    a fake current CUDA device (``state["current"]``) that _device_scope switches."""
    state = {"current": 0, "seen": []}
    monkeypatch.setattr(dispatch, "backend_status", lambda name: (True, ""))
    monkeypatch.setattr(dispatch, "_cuda_current_index", lambda: state["current"])

    @contextlib.contextmanager
    def scope(index):
        old = state["current"]
        if index is not None:
            state["current"] = index
        try:
            yield
        finally:
            state["current"] = old

    monkeypatch.setattr(dispatch, "_device_scope", scope)
    monkeypatch.setattr(dispatch, "_tuned_backend_lookup", None)
    monkeypatch.setattr(dispatch, "_tuned_config_lookup", None)
    dispatch.register(OP, "reference")(_fn)
    dispatch.register(OP, "cpu", supports=lambda k: (k.device_type == "cpu", "needs CPU tensors"))(_fn)
    dispatch.register(OP, "cuda", supports=lambda k: (k.device_type == "cuda", "needs CUDA tensors"))(_fn)
    dispatch.register(OP, "triton", supports=_triton_supports)(_fn)
    dispatch.clear_memo()
    yield state
    dispatch._registry.pop(OP, None)
    monkeypatch.undo()
    dispatch.clear_memo()


def test_default_order_on_a_gpu_is_triton_before_cuda(fake_gpu):
    assert dispatch.DEFAULT_ORDER == ("triton", "cuda", "cpu", "reference")
    assert dispatch.select(OP, DKey())[0].backend == "triton"
    # cuda only where Triton refuses the inputs
    assert dispatch.select(OP, DKey(dtype="float64"))[0].backend == "cuda"
    assert dispatch.select(OP, DKey(), backend="cuda")[0].backend == "cuda"


def test_default_order_on_cpu_tensors_is_unchanged(fake_gpu):
    assert dispatch.select(OP, DKey(device_type="cpu"))[0].backend == "cpu"
    assert dispatch.select(OP, DKey(device_type="cpu"), backend="triton")[0].backend == "triton"


def _cos_sin_key(device_type, dtype="float32"):
    return CosSinKey(device_type, dtype, "float32", 64, 64, False, False, "int64", 4, 2, 64)


def test_real_ops_default_to_triton_on_a_gpu(fake_gpu, monkeypatch):
    """The registered rope kernels: on a (faked) GPU without a tuned entry, Triton."""
    from posattn.kernels import rope_cos_sin_native as native
    from posattn.kernels import triton as tk

    from tests.autotune._util import rope_key

    monkeypatch.setattr(native, "cuda_built", lambda: True)
    monkeypatch.setattr(tk, "device_ok", lambda device_type: True)
    assert dispatch.select("rope_cos_sin", _cos_sin_key("cuda"))[0].backend == "triton"
    assert dispatch.select("rope", rope_key(device_type="cuda"))[0].backend == "triton"
    assert dispatch.select("rope_cos_sin", _cos_sin_key("cpu"))[0].backend == "cpu"


def test_a_tuned_entry_may_choose_cuda(fake_gpu, monkeypatch):
    seen = []

    def tuned(op, key, ops):
        seen.append((op, key))
        return "cuda" if op == OP else None

    monkeypatch.setattr(dispatch, "_tuned_backend_lookup", tuned)
    dispatch.clear_memo()
    assert dispatch.select(OP, DKey())[0].backend == "cuda"
    assert seen == [(OP, DKey())]
    # a tuned choice the inputs do not allow falls back to the default order
    monkeypatch.setattr(dispatch, "_tuned_backend_lookup", lambda op, key, ops: "cpu")
    dispatch.clear_memo()
    assert dispatch.select(OP, DKey())[0].backend == "triton"


def test_memo_is_per_cuda_device(fake_gpu, monkeypatch):
    """Two GPUs of different kinds: the tuned cache of device 1 picks cuda, device 0 has none."""
    state = fake_gpu
    calls = []

    def tuned(op, key, ops):
        calls.append(state["current"])  # the lookup sees the inputs' device as current
        return "cuda" if state["current"] == 1 else None

    monkeypatch.setattr(dispatch, "_tuned_backend_lookup", tuned)
    dispatch.clear_memo()
    k = DKey()
    assert dispatch.select(OP, k, device_index=0)[0].backend == "triton"
    assert dispatch.select(OP, k, device_index=1)[0].backend == "cuda"
    assert dispatch.select(OP, k, device_index=0)[0].backend == "triton"  # memoised, not shared
    assert dispatch.select(OP, k, device_index=1)[0].backend == "cuda"
    assert calls == [0, 1]
    assert state["current"] == 0  # restored after the decision
    # without device_index: the current device
    state["current"] = 1
    assert dispatch.select(OP, k)[0].backend == "cuda"
    state["current"] = 0
    assert dispatch.select(OP, k)[0].backend == "triton"
    assert calls == [0, 1]
    # CPU keys ignore the index
    assert dispatch.select(OP, DKey(device_type="cpu"), device_index=3)[0].backend == "cpu"


def test_memo_hit_is_one_lookup_after_the_first_call(fake_gpu, monkeypatch):
    k = DKey()
    first = dispatch.select(OP, k, device_index=0)
    monkeypatch.setattr(dispatch, "_select_uncached", lambda *a: pytest.fail("memo miss"))
    assert dispatch.select(OP, k, device_index=0) is first


# ---------------------------------------------------------------------------
# verified_backends: tuned entries and shipped configs


@pytest.fixture
def cache_dirs(tmp_path, monkeypatch):
    from posattn import autotune
    from posattn.autotune import cache as C

    tune, shipped = tmp_path / "tune", tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("POSATTN_TUNE_DIR", str(tune))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(C, "shipped_dir", lambda: shipped)
    autotune.reload()
    yield tune, shipped
    monkeypatch.undo()
    autotune.reload()


def _fake_h200():
    from posattn.device import Device

    return Device("cuda", "NVIDIA H200", "nvidia-h200", "nvidia-h200-cc90-sm132", capability="9.0", sm_count=132)


def _entry(op, backend, key, status="ok", version=1):
    from posattn.autotune import cache as C

    fields = C.key_fields(key)
    return {"op": op, "backend": backend, "version": version, "key": fields,
            "bucket_fields": C.bucket_fields(fields), "default": {},
            "results": [{"config": {"threads": 256}, "status": status,
                         "time_s": 1e-5 if status == "ok" else None, "error": ""}],
            "updated": C.now_iso()}


def _write(path, fp, entries):
    from posattn.autotune import cache as C

    C.write_entries(path, {"fingerprint": fp, "device": {"slug": "nvidia-h200", "kind": "cuda"}, "versions": {}},
                    entries)


def test_verified_backends_reads_shipped_and_tuned_entries(cache_dirs, monkeypatch):
    from posattn import device as pdev

    tune, shipped = cache_dirs
    dev = _fake_h200()
    monkeypatch.setattr(pdev, "device_for", lambda device_type, index=None: dev)
    assert dispatch.verified_backends("cuda", 0) == {}
    key = _cos_sin_key("cuda")
    _write(shipped / f"{dev.slug}.json", dev.fingerprint, [_entry("rope_cos_sin", "cuda", key)])
    assert dispatch.verified_backends("cuda", 0) == {"cuda": {"ops": ["rope_cos_sin"], "layers": ["shipped"]}}
    # a mismatch (disagreed with the reference) or an old kernel version verifies nothing
    _write(tune / f"{dev.fingerprint}.json", dev.fingerprint,
           [_entry("rope_cos_sin", "triton", key, status="mismatch"), _entry("rope", "triton", key, version=99)])
    assert set(dispatch.verified_backends("cuda", 0)) == {"cuda"}
    _write(tune / f"{dev.fingerprint}.json", dev.fingerprint, [_entry("rope_cos_sin", "triton", key)])
    got = dispatch.verified_backends("cuda", 0)
    assert list(got) == ["triton", "cuda"]
    assert got["triton"] == {"ops": ["rope_cos_sin"], "layers": ["POSATTN_TUNE_DIR"]}


def test_two_gpu_kinds_read_their_own_tuned_configs(fake_gpu, cache_dirs, monkeypatch):
    """End to end through the autotuner's lookups: device 0 (an H200 with a shipped entry that
    verified cuda) and device 1 (an A100 with none) in one process get different decisions."""
    import torch

    from posattn import autotune
    from posattn.autotune import fingerprint
    from posattn.device import Device

    state = fake_gpu
    _, shipped = cache_dirs
    devs = {0: _fake_h200(), 1: Device("cuda", "NVIDIA A100", "nvidia-a100", "nvidia-a100-cc80-sm108",
                                       capability="8.0", sm_count=108)}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(fingerprint, "device_for", lambda t, i=None: devs[state["current"] if i is None else i])
    _write(shipped / "nvidia-h200.json", devs[0].fingerprint, [_entry(OP, "cuda", DKey())])
    autotune.reload()  # installs the real lookups (the fixture had removed them)
    assert dispatch.select(OP, DKey(), device_index=0)[0].backend == "cuda"
    assert dispatch.select(OP, DKey(), device_index=1)[0].backend == "triton"
    assert dispatch.select(OP, DKey(), device_index=0)[0].backend == "cuda"
    # and with the memo forgotten, in the other order
    dispatch.clear_memo()
    assert dispatch.select(OP, DKey(), device_index=1)[0].backend == "triton"
    assert dispatch.select(OP, DKey(), device_index=0)[0].backend == "cuda"


def test_public_ops_pass_the_inputs_device_to_select(monkeypatch):
    """Every select() made by a public op names the inputs' device (device_index=...), so a
    tensor on a GPU that is not the current one gets that GPU's decision and configs."""
    import torch

    import posattn
    calls = []
    real = dispatch.select

    def spy(op, key, **kw):
        calls.append((op, "device_index" in kw))
        return real(op, key, **kw)

    monkeypatch.setattr(dispatch, "select", spy)
    dispatch.clear_memo()                   # drops every op's plans too: each call selects anew
    spec = posattn.RopeSpec(head_dim=16)
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16)
    pos = torch.arange(5)
    posattn.apply_rope(q, k, pos, spec)
    posattn.apply_rope(q.requires_grad_(), k, pos, spec)
    posattn.apply_rope_angles(q.detach(), k, torch.rand(1, 5, 1, 8))
    posattn.rope_shift(k, 3, spec)
    qa, ka, va = (torch.randn(9, h, 16) for h in (2, 1, 1))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    posattn.anchor_attention(qa, ka, va, cu)
    # the serving ops: a paged cache of 4 pages x 4 slots, 2 requests
    kc, vc = torch.zeros(4, 4, 1, 16), torch.zeros(4, 4, 1, 16)
    seqlens = torch.tensor([3, 2], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    posattn.rope_and_cache(torch.randn(2, 2, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16),
                           torch.tensor([3, 2]), spec, kc, vc, torch.tensor([3, 8]))
    posattn.decode_attention(torch.randn(2, 1, 2, 16), kc, vc, seqlens, block_table=table)
    posattn.kv_compact(kc, vc, seqlens.clone(), torch.tensor([[4], [3]], dtype=torch.int32),
                       torch.tensor([1, 1], dtype=torch.int32), block_table=table)
    s = posattn.select.scores(torch.randn(2, 2, 16), kc, seqlens, block_table=table)
    posattn.select.topk(s, 2)
    ops = {op for op, _ in calls}
    assert {"rope", "rope_angles", "anchor_attention", "rope_and_cache", "decode_attention", "kv_compact",
            "scores", "topk"} <= ops, ops
    assert calls and all(named for _, named in calls), calls

"""Helpers shared by the autotune tests (also run as a script by the subprocess tests)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from posattn import dispatch
from posattn.autotune import cache as C
from posattn.autotune import fingerprint as F
from posattn.autotune import tuner


@dataclass(frozen=True)
class TKey:
    """Kernel key of the test-only op ``tunetest``."""

    device_type: str = "cpu"
    dtype: str = "float32"
    n_bucket: int = 64


def rope_key(tokens_bucket=16, heads_q=3, heads_k=1, head_dim=16, dtype="float32", **kw):
    from posattn.rope.layout import RopeKey

    f = dict(device_type="cpu", dtype=dtype, head_dim=head_dim, rotary_dim=head_dim, interleaved=False,
             heads_q=heads_q, heads_k=heads_k, pos_dtype="int64", tokens_bucket=tokens_bucket)
    f.update(kw)
    return RopeKey(**f)


def cos_sin_key(tokens_bucket=64, heads_q=4, heads_k=2, head_dim=64, split=False, pos_dtype="int64", **kw):
    """Kernel key of apply_rope_cos_sin (cos_sin_cache + int64 positions unless told)."""
    from posattn.rope.cos_sin import CosSinKey

    f = dict(device_type="cpu", dtype="float32", table_dtype="float32", head_dim=head_dim, rotary_dim=head_dim,
             interleaved=False, split=split, pos_dtype=pos_dtype, heads_q=heads_q, heads_k=heads_k,
             tokens_bucket=tokens_bucket)
    f.update(kw)
    return CosSinKey(**f)


def entry(op, backend, key, results, version=1, default=None):
    fields = C.key_fields(key)
    return {"op": op, "backend": backend, "version": version, "key": fields,
            "bucket_fields": C.bucket_fields(fields), "default": default or {},
            "results": [{"config": c, "status": "ok", "time_s": t, "error": ""} for c, t in results],
            "updated": C.now_iso()}


def header(fp=None):
    dev = F.cpu_device()
    return {"fingerprint": fp or dev.fingerprint, "device": {"slug": dev.slug, "kind": "cpu"}, "versions": {}}


def cpu_file(directory):
    return directory / f"{F.cpu_device().fingerprint}.json"


# -- the test-only op: a kernel whose config decides how much redundant work it does


def tunetest_kernel(x, out, config):
    if config.get("wrong"):
        out.copy_(x + 1.0)  # fast and wrong: must be rejected by the reference check
        return
    if config.get("boom"):
        raise RuntimeError("launch failed (test)")
    for _ in range(int(config.get("work", 1))):
        torch.mul(x, 2.0, out=out)
    if config.get("sleep_ms"):
        time.sleep(config["sleep_ms"] / 1000.0)


class TunetestAdapter:
    @staticmethod
    def input_bytes(key):
        return key.n_bucket * 4 * 2

    @staticmethod
    def make_inputs(key, device, index=0):
        x = torch.randn(key.n_bucket)
        return {"x": x, "out": torch.empty_like(x)}

    @staticmethod
    def run(kernel, config, inputs):
        kernel.fn(inputs["x"], inputs["out"], config)

    @staticmethod
    def reference_check(key, inputs, run_once):
        inputs["out"].fill_(float("nan"))
        run_once()
        if not torch.allclose(inputs["out"], inputs["x"] * 2.0):
            return "differs from x * 2"
        return None


def register_tunetest(space, default, version=1):
    dispatch.register("tunetest", "cpu", default_config=lambda key: dict(default),
                      search_space=lambda key: [dict(c) for c in space], version=version)(tunetest_kernel)
    tuner.register_adapter("tunetest", TunetestAdapter)


def unregister_tunetest():
    dispatch._registry.pop("tunetest", None)
    tuner._ADAPTERS.pop("tunetest", None)
    dispatch.clear_memo()


# -- subprocess entry points


def _tune_forever(n_keys):
    """Tune many tiny real rope keys on the cpu backend, writing after each."""
    settings = tuner.Settings(warmup=1, min_reps=3, max_reps=5, budget_s=0.001, rounds=1, max_sets=2)
    for i in range(n_keys):
        k = rope_key(tokens_bucket=1 << (i % 6), heads_q=1 + i // 6, heads_k=1, head_dim=8)
        tuner.tune_key("rope", k, backends=["cpu"], settings=settings,
                       spaces={"cpu": [{"threads": 1, "chunk": 16}]})
        print(f"key {i}", flush=True)


if __name__ == "__main__":
    import posattn  # noqa: F401  (registers the kernels)

    if sys.argv[1] == "tune":
        _tune_forever(int(sys.argv[2]))

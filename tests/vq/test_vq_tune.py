"""posattn.vq's centroid-lookup scores in the tuner, for real on the CPU: inputs, launch and reference
check; a kernel that skips slots is a mismatch; the chosen config reaches dispatch; posattn tune
builds its keys."""
from posattn import autotune, dispatch
from posattn.autotune import keys as K
from posattn.autotune import tuner
from posattn.autotune.shapes import ModelShape
from posattn.vq import VqScoresKey
from tests.autotune.conftest import dirs  # noqa: F401  (the isolated tune folders)
from tests.conftest import DEVICE

FAST = tuner.Settings(warmup=1, min_reps=3, max_reps=5, budget_s=0.003, rounds=2, max_sets=2)
KEY = VqScoresKey("cpu", "float32", 32, 4, 2, 64, 16, 256, 2)


def test_cpu_tuned_and_used(dirs):   # noqa: F811
    space = [{"threads": 1, "block_s": 64}, {"threads": 2, "block_s": 256}]
    [r] = tuner.tune_key("vq_code_scores", KEY, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    assert all(x["status"] == "ok" for x in r.results), r.results
    autotune.reload()
    assert dispatch.select("vq_code_scores", KEY, backend="cpu")[1] == r.best["config"]


def test_a_kernel_that_skips_slots_is_a_mismatch(dirs, monkeypatch):   # noqa: F811
    kern = dispatch.kernels("vq_code_scores")["cpu"]
    real = kern.fn

    def lazy(*args):
        out = real(*args)
        if args[-1].get("block_s") == 64:
            out[-1, -1, 3] = 0.0
        return out

    monkeypatch.setitem(dispatch._registry["vq_code_scores"], "cpu", type(kern)(**{**kern.__dict__, "fn": lazy}))
    space = [{"threads": 1, "block_s": 64}, {"threads": 1, "block_s": 256}]
    [r] = tuner.tune_key("vq_code_scores", KEY, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    st = {x["config"]["block_s"]: x["status"] for x in r.results}
    assert st[256] == "ok" and st[64] == "mismatch", st


def test_triton_candidates_checked(dirs):   # noqa: F811
    k = VqScoresKey(DEVICE, "float32", 32, 4, 2, 64, 16, 256, 2)
    space = tuner.candidates(dispatch.kernels("vq_code_scores")["triton"], k)[1][:2]
    [r] = tuner.tune_key("vq_code_scores", k, backends=["triton"], spaces={"triton": space}, settings=FAST)
    assert r.results and all(x["status"] == "ok" for x in r.results), r.results


def test_tune_builds_keys():
    ks = K.keys_for("vq_code_scores", ModelShape(32, 8, 128, 128, False, "test"), "bfloat16", [4096, 131072], "cuda")
    assert ks and all(isinstance(k, VqScoresKey) and k.device_type == "cuda" for k in ks)

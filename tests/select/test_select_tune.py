"""posattn.select's kernels in the tuner, for real on the CPU: the adapter's inputs, launch and
reference check; a kernel that skips work is a mismatch; the chosen config reaches dispatch;
posattn tune builds keys for the three ops."""
import pytest

from posattn import autotune, dispatch
from posattn.autotune import keys as K
from posattn.autotune import tuner
from posattn.autotune.shapes import ModelShape
from posattn.select.quest import PageScoresKey
from posattn.select.scores import ScoresKey
from posattn.select.topk import TopkKey
from tests.autotune.conftest import dirs  # noqa: F401  (the isolated tune folders)
from tests.conftest import DEVICE

FAST = tuner.Settings(warmup=1, min_reps=3, max_reps=5, budget_s=0.003, rounds=2, max_sets=2)
KEYS = {
    "topk": TopkKey("cpu", "float32", 64, 1024, 4),
    "scores": ScoresKey("cpu", "float32", 32, 4, 2, 16, False, 256, 2),
    "page_scores": PageScoresKey("cpu", "bfloat16", 32, 4, 2, 16, 2),
}


@pytest.mark.parametrize("op", sorted(KEYS))
def test_cpu_tuned_and_used(dirs, op):   # noqa: F811
    k = KEYS[op]
    space = [{"threads": 1}, {"threads": 2}]
    [r] = tuner.tune_key(op, k, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    assert all(x["status"] == "ok" for x in r.results), r.results
    autotune.reload()
    assert dispatch.select(op, k, backend="cpu")[1] == r.best["config"]


def test_a_topk_that_skips_rows_is_a_mismatch(dirs, monkeypatch):   # noqa: F811
    kern = dispatch.kernels("topk")["cpu"]
    real = kern.fn

    def lazy(*args):
        out = real(*args)
        if args[-1].get("threads") == 2:
            out[-1] = -1
        return out

    monkeypatch.setitem(dispatch._registry["topk"], "cpu", type(kern)(**{**kern.__dict__, "fn": lazy}))
    [r] = tuner.tune_key("topk", KEYS["topk"], backends=["cpu"], spaces={"cpu": [{"threads": 1}, {"threads": 2}]},
                         settings=FAST)
    st = {x["config"]["threads"]: x["status"] for x in r.results}
    assert st[1] == "ok" and st[2] == "mismatch", st


@pytest.mark.parametrize("op", sorted(KEYS))
def test_triton_candidates_checked(dirs, op):   # noqa: F811
    k = KEYS[op]
    k = type(k)(**{**k.__dict__, "device_type": DEVICE})
    space = tuner.candidates(dispatch.kernels(op)["triton"], k)[1][:3]
    [r] = tuner.tune_key(op, k, backends=["triton"], spaces={"triton": space}, settings=FAST)
    assert r.results and all(x["status"] == "ok" for x in r.results), r.results


def test_tune_builds_keys():
    shape = ModelShape(32, 8, 128, 128, False, "test")
    for op in ("topk", "scores", "page_scores"):
        ks = K.keys_for(op, shape, "bfloat16", [4096, 131072], "cuda")
        assert ks and all(k.device_type == "cuda" for k in ks)

"""decode_attention in the tuner, for real on the CPU: the adapter's inputs, launch and
reference check; a kernel that skips work is a mismatch; the chosen config reaches dispatch."""
import pytest

from posattn import autotune, dispatch
from posattn.autotune import tuner
from posattn.decode.attention import DecodeKey
from tests.autotune.conftest import dirs  # noqa: F401  (the isolated tune folders)

FAST = tuner.Settings(warmup=1, min_reps=3, max_reps=5, budget_s=0.003, rounds=2, max_sets=2)


def _key(**kw):
    base = dict(device_type="cpu", dtype="float32", head_dim=32, heads_q=4, heads_k=2, page_size=16, paged=True,
                tree=False, causal=True, windowed=False, q_bucket=1, kv_bucket=256, batch_bucket=2)
    base.update(kw)
    return DecodeKey(**base)


@pytest.mark.parametrize("kw", [{}, dict(tree=True, q_bucket=8), dict(paged=False, windowed=True)])
def test_cpu_splits_tuned_and_used(dirs, kw):   # noqa: F811
    k = _key(**kw)
    space = [{"threads": 1, "block_n": 64, "num_splits": 1}, {"threads": 2, "block_n": 32, "num_splits": 2}]
    [r] = tuner.tune_key("decode_attention", k, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    assert all(x["status"] == "ok" for x in r.results), r.results
    autotune.reload()
    assert dispatch.select("decode_attention", k, backend="cpu")[1] == r.best["config"]


def test_a_config_that_skips_work_is_a_mismatch(dirs, monkeypatch):   # noqa: F811
    kern = dispatch.kernels("decode_attention")["cpu"]
    real = kern.fn

    def lazy(*args):
        out, lse = real(*args)
        if args[-1].get("num_splits") == 2:
            out.zero_()
        return out, lse

    monkeypatch.setitem(dispatch._registry["decode_attention"], "cpu", type(kern)(**{**kern.__dict__, "fn": lazy}))
    space = [{"threads": 1, "block_n": 64, "num_splits": 1}, {"threads": 1, "block_n": 64, "num_splits": 2}]
    [r] = tuner.tune_key("decode_attention", _key(), backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    st = {x["config"]["num_splits"]: x["status"] for x in r.results if x["config"].get("threads") == 1}
    assert st == {1: "ok", 2: "mismatch"}


def test_triton_candidates_checked(dirs):   # noqa: F811
    """The Triton kernel's candidates (split counts, key blocks) all pass the adapter's check
    (in the interpreter on CPU tensors; compiled on a GPU)."""
    from tests.conftest import DEVICE

    k = _key(device_type=DEVICE, tree=True, q_bucket=4, kv_bucket=64, head_dim=16)
    space = [dict(tuner.candidates(dispatch.kernels("decode_attention")["triton"], k)[0], num_splits=s, BLOCK_N=bn)
             for s, bn in ((1, 16), (3, 32))]
    [r] = tuner.tune_key("decode_attention", k, backends=["triton"], spaces={"triton": space}, settings=FAST)
    assert r.results and all(x["status"] == "ok" for x in r.results), r.results


@pytest.mark.parametrize("rotary, qk", [("k", "bf16"), ("map", "bf16x3"), ("q", "bf16x3")])
def test_rotary_keys_tuned_with_their_rotation(dirs, rotary, qk):   # noqa: F811
    """Keys of the in-kernel rotation (pre-RoPE cache, ReRoPE, q-only bf16x3) are timed with their
    DecodeRotary and checked against the fp64 reference with the same rotation; a kernel that
    ignores the rotation is a mismatch."""
    from tests.conftest import DEVICE

    k = _key(device_type=DEVICE, dtype="bfloat16", head_dim=16, kv_bucket=64, rotary=rotary, qk_precision=qk)
    backends = ["cpu", "triton"] if DEVICE == "cpu" else ["triton"]
    for b in backends:
        space = [tuner.candidates(dispatch.kernels("decode_attention")[b], k)[0]]
        [r] = tuner.tune_key("decode_attention", k, backends=[b], spaces={b: space}, settings=FAST)
        assert r.results and all(x["status"] == "ok" for x in r.results), (b, r.results)


def test_rotary_key_without_rotation_is_a_mismatch(dirs, monkeypatch):   # noqa: F811
    kern = dispatch.kernels("decode_attention")["cpu"]
    real = kern.fn

    def no_rot(*args, rot=None):
        return real(*args)

    monkeypatch.setitem(dispatch._registry["decode_attention"], "cpu", type(kern)(**{**kern.__dict__, "fn": no_rot}))
    k = _key(dtype="bfloat16", head_dim=16, kv_bucket=64, rotary="map", qk_precision="bf16")
    space = [{"threads": 1, "block_n": 64, "num_splits": 1}]
    [r] = tuner.tune_key("decode_attention", k, backends=["cpu"], spaces={"cpu": space}, settings=FAST)
    assert r.results and all(x["status"] == "mismatch" for x in r.results), r.results

"""decode_attention's plans (the repeated-signature path), host-sync freedom, the custom op and
torch.compile."""
import pytest
import torch

import posattn
from posattn import dispatch
from posattn.decode import attention as A
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.decode._oracle import Case

NATIVE = [b for b in usable_backends("decode_attention") if b != "reference"]


@pytest.fixture(autouse=True)
def _fresh_plans():
    A.clear_plans()
    yield
    A.clear_plans()


def _case(**kw):
    base = dict(q_lens=[3, 0, 2], cached=[4, 2, 5], page_size=4, tree=True, append=True, rope=posattn.RopeSpec(16),
                device=DEVICE)
    base.update(kw)
    return Case(**base)


def test_repeated_signature_reuses_one_plan():
    case = _case()
    args, kw = case.args()
    out1 = posattn.decode_attention(*args, **kw, backend="reference")
    assert len(A._PLANS) == 1
    args2, kw2 = case.args()
    out2 = posattn.decode_attention(*args2, **kw2, backend="reference")
    assert len(A._PLANS) == 1 and torch.equal(out1, out2)
    posattn.decode_attention(*args2, **dict(kw2, window=3), backend="reference")   # a new signature: a new plan
    assert len(A._PLANS) == 2
    dispatch.clear_memo()
    assert len(A._PLANS) == 0


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(A, "PLAN_CACHE_SIZE", 2)
    case = _case()
    for w in (2, 3, 4, 5):
        args, kw = case.args()
        posattn.decode_attention(*args, **dict(kw, window=w), backend="reference")
        assert len(A._PLANS) <= 2


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("padded, indexed", [(False, ""), (True, ""), (False, "kv")])
def test_planned_path_reads_no_value_on_the_host(backend, padded, indexed, monkeypatch):
    """After the first (checked) call, a decode step does device work only: no .item(), .tolist()
    or .cpu(), so it can be captured in a CUDA graph."""
    case = _case(q_lens=[2, 2], cached=[3, 5], padded=padded) if padded else _case(indexed=indexed)
    args, kw = case.args()
    first = posattn.decode_attention(*args, **kw, backend=backend)

    def boom(*a, **k):
        raise AssertionError("host sync on the planned path")

    args, kw = case.args()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu"):
            m.setattr(torch.Tensor, name, boom)
        again = posattn.decode_attention(*args, **kw, backend=backend)
    assert torch.equal(first, again)


def test_checked_path_does_read_values(monkeypatch):
    """The first call of a signature checks values (the sync the plan then skips)."""
    case = _case()
    args, kw = case.args()

    def boom(*a, **k):
        raise AssertionError("synced")

    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    with pytest.raises(AssertionError, match="synced"):
        posattn.decode_attention(*args, **kw, backend="reference")


def _lowered(case):
    T = sum(case.q_lens)
    return (case.q, case.k_cache, case.v_cache, case.block_table, case.cache_seqlens, case.cu, case.tree_mask,
            True, -1, case.D ** -0.5, 0, max(case.q_lens), "cpu" if DEVICE == "cpu" else "triton"), T


@pytest.mark.parametrize("indexed", ["", "q"])
def test_custom_op_opcheck(indexed):
    case = _case(rope=None, append=False, indexed=indexed)
    args, _ = _lowered(case)
    if indexed:
        args = args + (case.kv_indices,)
    torch.library.opcheck(torch.ops.posattn.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [b for b in NATIVE if b == "cpu"] or [None])
def test_torch_compile_fullgraph(backend):
    if backend is None:
        pytest.skip("no native backend for these tensors")
    # a spec no other test used: its tables are built while tracing (no eager call before)
    case = _case(rope=posattn.RopeSpec(16, base=12347.0, interleaved=True))
    torch._dynamo.reset()

    def step(q, kc, vc, cs, bt, cu, k, v, tm):
        return posattn.decode_attention(q, kc, vc, cs, block_table=bt, cu_seqlens_q=cu, k=k, v=v, tree_mask=tm,
                                        rope=case.rope, return_lse=True, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    args, kw = case.args()
    got_out, got_lse = compiled(args[0], args[1], args[2], args[3], kw["block_table"], kw["cu_seqlens_q"], kw["k"],
                                kw["v"], kw["tree_mask"])
    args2, kw2 = case.args()
    ref_out, ref_lse = step(args2[0], args2[1], args2[2], args2[3], kw2["block_table"], kw2["cu_seqlens_q"],
                            kw2["k"], kw2["v"], kw2["tree_mask"])
    assert_close(got_out, ref_out, case.dtype, "attention")
    assert torch.equal(args[1], args2[1]) and torch.equal(args[2], args2[2]), "the compiled step appends the same k/v"
    fin = torch.isfinite(ref_lse)
    assert_close(got_lse[fin], ref_lse[fin], case.dtype, "attention")

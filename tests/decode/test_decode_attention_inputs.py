"""decode_attention's bad-input errors: named ValueError/TypeError before any kernel runs."""
import pytest
import torch

import posattn
from posattn.decode import attention as A
from tests.conftest import DEVICE
from tests.decode._oracle import Case


@pytest.fixture(autouse=True)
def _no_kernel(monkeypatch):
    """Any kernel launch during these tests is a failure: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the error")

    monkeypatch.setattr(A._Plan, "run", lambda *a, **k: boom())
    A.clear_plans()
    yield
    A.clear_plans()


def _call(case=None, **over):
    case = case or Case(q_lens=[2, 1], cached=[3, 4], page_size=4, device=DEVICE, tree=True, append=True)
    args, kw = case.args()
    names = ("q", "k_cache", "v_cache", "cache_seqlens")
    a = dict(zip(names, args))
    for n in names:
        if n in over:
            a[n] = over.pop(n)
    kw.update(over)
    return posattn.decode_attention(*(a[n] for n in names), **kw)


@pytest.mark.parametrize("over, exc, words", [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.zeros(3, 4, 16, dtype=torch.int32)), TypeError, "q must be float"),
    (dict(k_cache=torch.zeros(10, 4, 2, 16, dtype=torch.float16)), TypeError, "k_cache and v_cache must have q's dtype"),
    (dict(k_cache=torch.zeros(10, 4, 2, 16)), ValueError, "v_cache must have k_cache's shape"),
    (dict(cache_seqlens=torch.tensor([3, 4])), TypeError, "cache_seqlens must be an int32"),
    (dict(cache_seqlens=torch.tensor([3, 4, 5], dtype=torch.int32)), ValueError, "cache_seqlens must be [B]"),
    (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "cu_seqlens_q describes 2 requests"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "block_table must be an int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 3])), TypeError, "cu_seqlens_q must be an int32"),
    (dict(k=None), ValueError, "k and v must be given together"),
    (dict(k=torch.zeros(3, 1, 16)), ValueError, "k must be [3, 2, 16]"),
    (dict(tree_mask=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "tree_mask must be [3, ceil(Tmax/32)]"),
    (dict(tree_mask=torch.zeros(3, 1, dtype=torch.int64)), TypeError, "tree_mask must be an int32"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(window=0), ValueError, "window must be a positive int"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
    (dict(num_splits=0), ValueError, "num_splits must be a positive int"),
    (dict(positions=torch.arange(3)), ValueError, "positions were given without rope"),
    (dict(rope=posattn.RopeSpec(32)), ValueError, "rope.head_dim (32) must equal"),
    (dict(rope=posattn.RopeSpec(16), positions=torch.arange(4)), ValueError, "positions must be [3]"),
    (dict(rope="llama"), TypeError, "rope must be a posattn.RopeSpec"),
    (dict(backend="cuda"), ValueError, "backend='cuda'"),
    (dict(kv_indices=torch.zeros(2, 2, 4, dtype=torch.int64)), TypeError, "kv_indices must be an int32"),
    (dict(kv_indices=torch.zeros(2, 3, 4, dtype=torch.int32)), ValueError, "kv_indices must be [2, 2 (Hk) or 4 (Hq)"),
    (dict(kv_indices=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "kv_indices must be 3-D"),
])
def test_bad_arguments(over, exc, words):
    with pytest.raises(exc, match=None) as ei:
        _call(**over)
    assert words in str(ei.value), str(ei.value)


def test_gqa_not_a_multiple():
    case = Case(q_lens=[1], cached=[2], HQ=3, HK=2, device=DEVICE)
    with pytest.raises(ValueError, match=r"multiple of k_cache's \(2\)"):
        _call(case)


def test_mismatched_devices():
    if DEVICE == "cpu":
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="cache_seqlens is on cpu"):
        _call(cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))


def test_capacity():
    case = Case(q_lens=[2, 1], cached=[3, 4], device=DEVICE)            # contiguous: S_cap >= 5
    S = case.k_cache.shape[1]
    with pytest.raises(ValueError, match=r"exceeds request 0's capacity: cache_seqlens\[0\] = .* plus 2 new"):
        _call(case, cache_seqlens=torch.tensor([S - 1, 0], dtype=torch.int32, device=DEVICE))


def test_block_table_out_of_range():
    case = Case(q_lens=[2, 1], cached=[3, 4], page_size=2, device=DEVICE)
    bt = case.block_table.clone()
    bt[1, 1] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = .* out of range"):
        _call(case, block_table=bt)
    bt[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = -1 is out of range"):
        _call(case, block_table=bt)


def test_unused_block_table_columns_may_hold_anything():
    case = Case(q_lens=[1, 1], cached=[1, 1], page_size=2, device=DEVICE)
    bt = torch.full((2, 4), -7, dtype=torch.int32, device=DEVICE)
    bt[:, 0] = case.block_table[:, 0]
    with pytest.raises(AssertionError, match="kernel ran"):   # the checks pass; the (patched) run raises
        _call(case, block_table=bt)


def test_tree_mask_narrower_than_longest_request():
    case = Case(q_lens=[33, 1], cached=[0, 0], tree=True, device=DEVICE, HQ=2, HK=1, D=8)
    with pytest.raises(ValueError, match=r"longest request has 33 new tokens: it needs ceil\(33/32\) = 2 words"):
        _call(case, tree_mask=case.tree_mask[:, :1].contiguous(), k=None, v=None)


def test_cu_seqlens_q_values():
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and end at 3"):
        _call(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="non-decreasing"):
        _call(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32, device=DEVICE))


def test_kv_indices_values():
    idx = torch.full((2, 2, 4), -1, dtype=torch.int32, device=DEVICE)
    idx[1, 0, 2] = 4                      # request 1 caches 4 tokens: slots 0..3
    with pytest.raises(ValueError, match=r"kv_indices\[1, 0, 2\] = 4: entries must be -1 \(padding\) or a cached "
                                         r"slot of request 1, 0..3"):
        _call(kv_indices=idx)
    idx[1, 0, 2] = -2
    with pytest.raises(ValueError, match=r"kv_indices\[1, 0, 2\] = -2"):
        _call(kv_indices=idx)

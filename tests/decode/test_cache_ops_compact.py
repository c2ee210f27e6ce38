"""kv_compact on every backend vs an fp64 oracle (overlapping moves, paged and contiguous,
NHD and HND, odd sizes), bad input, plans, strided index tensors, the tuner adapter."""
from __future__ import annotations

import pytest
import torch

import posattn
from tests.conftest import DEVICE, usable_backends

CBACKENDS = [b for b in usable_backends("kv_compact") if b != "cuda"]   # cuda: tests/kernels/test_cache_cuda.py


def _compact_case(B, N, page, HK, D, DV, paged, dtype, gen):
    """Random accepted-path moves: cached lengths, sources (ascending, >= the length,
    overlapping the destinations) and counts."""
    lens = torch.randint(0, 9, (B,), generator=gen)
    counts = torch.randint(0, N + 1, (B,), generator=gen)
    src = torch.zeros(B, N, dtype=torch.int64)
    for b in range(B):
        pool = torch.randperm(N + 3, generator=gen)[:N].sort().values + lens[b]
        src[b] = pool
    cap = int((lens + N + 3).max())
    if paged:
        mb = -(-cap // page)
        nblk = B * mb + 2
        bt = torch.randperm(nblk, generator=gen)[:B * mb].view(B, mb).int()   # pages in any order
        kc = torch.randn(nblk, page, HK, D, generator=gen).to(dtype)
        vc = torch.randn(nblk, page, HK, DV, generator=gen).to(dtype)
    else:
        bt = None
        kc = torch.randn(B, cap, HK, D, generator=gen).to(dtype)
        vc = torch.randn(B, cap, HK, DV, generator=gen).to(dtype)
    return kc, vc, lens.int(), src, counts.int(), bt


def _compact_oracle(kc, vc, lens, src, counts, bt):
    kc, vc = kc.clone(), vc.clone()
    page = kc.shape[1]

    def at(b, l):
        return (int(bt[b, l // page]), l % page) if bt is not None else (b, l)

    for b in range(src.shape[0]):
        L = int(lens[b])
        rows = [(kc[at(b, int(src[b, i]))].clone(), vc[at(b, int(src[b, i]))].clone()) for i in range(int(counts[b]))]
        for i, (kk, vv) in enumerate(rows):
            kc[at(b, L + i)] = kk
            vc[at(b, L + i)] = vv
    return kc, vc, lens + counts


@pytest.mark.parametrize("backend", CBACKENDS)
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_compact_matches_oracle(backend, paged, layout):
    gen = torch.Generator().manual_seed(1)
    cases = ((torch.float32, (3, 5, 4, 3, 80, 64)), (torch.bfloat16, (2, 21, 1, 1, 64, 96)))
    for dtype, (B, N, page, HK, D, DV) in cases:
        kc, vc, lens, src, counts, bt = _compact_case(B, N, page, HK, D, DV, paged, dtype, gen)
        ekc, evc, elens = _compact_oracle(kc, vc, lens, src, counts, bt)
        if layout == "HND":   # the same logical cache stored [blocks, Hk, page, D]
            kc, vc = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
            kct, vct = kc.transpose(1, 2), vc.transpose(1, 2)
        else:
            kct, vct = kc, vc
        mv = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
        kct, vct, lens_d = mv(kct), mv(vct), mv(lens)
        posattn.kv_compact(kct, vct, lens_d, mv(src), mv(counts), block_table=mv(bt), kv_layout=layout,
                           backend=backend)
        got_k = kct if layout == "NHD" else kct.transpose(1, 2)
        got_v = vct if layout == "NHD" else vct.transpose(1, 2)
        assert torch.equal(got_k.cpu(), ekc), f"{backend} {dtype} k"
        assert torch.equal(got_v.cpu(), evc), f"{backend} {dtype} v"
        assert torch.equal(lens_d.cpu(), elens.int())


def test_kv_compact_overlap_shift_by_one():
    """The hardest overlap: every destination is the previous token's source."""
    for backend in CBACKENDS:
        kc = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1).expand(1, 12, 1, 16).contiguous().to(DEVICE)
        vc = kc.clone()
        lens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
        src = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11]], device=DEVICE)
        posattn.kv_compact(kc, vc, lens, src, torch.tensor([9], device=DEVICE), backend=backend)
        assert kc[0, :, 0, 0].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11], backend
        assert int(lens[0]) == 11


def test_kv_compact_bad_input():
    kc, vc = torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([2, 1], dtype=torch.int32)

    def call(src=((2, 3), (1, 4)), counts=(2, 2), **kw):
        args = dict(block_table=bt)
        args.update(kw)
        posattn.kv_compact(args.pop("kc", kc), args.pop("vc", vc), args.pop("lens", lens.clone()),
                           torch.tensor(src), torch.tensor(counts), **args)

    call()
    with pytest.raises(ValueError, match="sources must be >= the cached length"):
        call(src=((1, 3), (1, 4)))
    with pytest.raises(ValueError, match="strictly ascending"):
        call(src=((3, 2), (1, 4)))
    with pytest.raises(ValueError, match=r"counts\[1\] = 3 must be in"):
        call(counts=(2, 3))
    with pytest.raises(ValueError, match="capacity"):
        call(src=((7, 9), (1, 4)))
    with pytest.raises(ValueError, match="block_table entries"):
        call(block_table=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table must be int32"):
        call(block_table=bt.long())
    with pytest.raises(TypeError, match="src must be an integer"):
        call(src=((2.0, 3.0), (1.0, 4.0)))
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same number of heads"):
        call(vc=torch.zeros(4, 4, 2, 8))
    with pytest.raises(TypeError, match="v_cache must have"):
        call(vc=vc.half())
    with pytest.raises(ValueError, match="src must be"):
        call(src=((2, 3),), counts=(2, 2))

@pytest.mark.parametrize("backend", CBACKENDS)
def test_kv_compact_strided_index_tensors(backend):
    """counts and block_table given as strided views (columns of wider tensors)."""
    gen = torch.Generator().manual_seed(5)
    kc, vc, lens, src, counts, bt = _compact_case(3, 4, 2, 2, 64, 64, True, torch.float32, gen)
    ekc, evc, elens = _compact_oracle(kc, vc, lens, src, counts, bt)
    counts_s = torch.stack((counts, counts + 7), 1)[:, 0]
    bt_s = torch.stack((bt, bt), 2)[:, :, 0]
    src_s = torch.stack((src, src), 2)[:, :, 1]
    assert counts_s.stride(0) == 2 and bt_s.stride(1) == 2 and src_s.stride(1) == 2
    kc, vc, lens = kc.to(DEVICE), vc.to(DEVICE), lens.to(DEVICE)
    posattn.kv_compact(kc, vc, lens, src_s.to(DEVICE), counts_s.to(DEVICE), block_table=bt_s.to(DEVICE),
                       backend=backend)
    assert torch.equal(kc.cpu(), ekc) and torch.equal(vc.cpu(), evc) and torch.equal(lens.cpu(), elens.int())

def test_kv_compact_bad_values_after_a_plan():
    """The value checks still run on a planned signature (CPU tensors, check=None)."""
    kc, vc = torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    posattn.kv_compact(kc, vc, torch.tensor([2, 1], dtype=torch.int32), torch.tensor([[2, 3], [1, 4]]),
                       torch.tensor([2, 2]), block_table=bt)
    with pytest.raises(ValueError, match="strictly ascending"):
        posattn.kv_compact(kc, vc, torch.tensor([2, 1], dtype=torch.int32), torch.tensor([[3, 2], [1, 4]]),
                           torch.tensor([2, 2]), block_table=bt)

def test_tuner_adapter_kv_compact():
    from posattn import dispatch
    from posattn.autotune import ops_cache
    from posattn.decode.compact import CompactKey

    for paged in (True, False):
        key = CompactKey("cpu", "bfloat16", 64, 2, paged, 8)
        kernel = dispatch.kernels("kv_compact")["cpu"]
        x = ops_cache.make_inputs(key, "cpu", 2)
        assert ops_cache.reference_check(key, x, lambda: ops_cache.run(kernel, {}, x)) is None
        x = ops_cache.make_inputs(key, "cpu", 2)
        assert "differs" in ops_cache.reference_check(key, x, lambda: None)

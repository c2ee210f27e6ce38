"""Sequence sharding: shard_ranges / shard_indices / shard_tensor / shard_positions, and RoPE on a
shard with its global positions equal to the unsharded rotation (bshd, packed thd with cu_seqlens)."""
import random

import pytest
import torch

import posattn
from posattn import distributed as D
from tests._tol import assert_close
from tests.attention.layouts import random_layout


@pytest.mark.parametrize("shard", ["zigzag", "contiguous"])
@pytest.mark.parametrize("T,W", [(16, 2), (37, 4), (5, 4), (0, 2), (9, 1)])
def test_shards_partition_the_tokens(shard, T, W):
    idx = [D.shard_indices(T, W, r, shard) for r in range(W)]
    assert sorted(torch.cat(idx).tolist()) == list(range(T))
    assert [len(i) for i in idx] == D.shard_sizes(T, W, shard)
    assert max(D.shard_sizes(T, W, shard)) - min(D.shard_sizes(T, W, shard)) <= (2 if shard == "zigzag" else 1)


def test_zigzag_holds_chunk_r_and_its_mirror():
    assert D.shard_ranges(16, 4, 0, "zigzag") == [(0, 2), (14, 16)]
    assert D.shard_ranges(16, 4, 2, "zigzag") == [(4, 6), (10, 12)]
    assert D.shard_ranges(16, 4, 1, "contiguous") == [(4, 8)]


def test_shard_tensor_on_a_sequence_dimension():
    x = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    for r in range(2):
        part = D.shard_tensor(x, 2, r, shard="zigzag", dim=1)
        assert torch.equal(part, x[:, D.shard_indices(10, 2, r, "zigzag")])


@pytest.mark.parametrize("shard", ["zigzag", "contiguous"])
def test_packed_positions_from_cu_seqlens_are_global(shard):
    """The Megatron bug class: a document crossing a shard boundary keeps counting on the next rank."""
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    full = torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6], dtype=torch.int32)
    for r in range(3):
        got = D.shard_positions(None, 3, r, shard=shard, cu_seqlens=cu)
        assert got.dtype == torch.int32
        assert torch.equal(got, full[D.shard_indices(13, 3, r, shard)])
        assert torch.equal(D.shard_positions(full, 3, r, shard=shard), got)


@pytest.mark.parametrize("shard", ["zigzag", "contiguous"])
@pytest.mark.parametrize("W", [2, 4])
def test_rope_on_packed_shard_equals_unsharded(shard, W):
    rng = random.Random(W)
    for _ in range(3):
        T = rng.randint(W, 50)
        cu, _ = random_layout(rng, T, rng.randint(1, 3), 1)
        spec = posattn.RopeSpec(80, rotary_dim=48)
        q, k = torch.randn(T, 3, 80), torch.randn(T, 1, 80)
        pos = D.shard_positions(None, 1, 0, cu_seqlens=cu)
        fq, fk = posattn.apply_rope(q, k, pos, spec, layout="thd", backend="cpu")
        for r in range(W):
            lq, lk = (D.shard_tensor(x, W, r, shard=shard) for x in (q, k))
            lpos = D.shard_positions(None, W, r, shard=shard, cu_seqlens=cu)
            oq, ok = posattn.apply_rope(lq, lk, lpos, spec, layout="thd", backend="cpu")
            assert_close(oq, D.shard_tensor(fq, W, r, shard=shard))
            assert_close(ok, D.shard_tensor(fk, W, r, shard=shard))


@pytest.mark.parametrize("shard", ["zigzag", "contiguous"])
def test_rope_on_bshd_sequence_shard_equals_unsharded(shard):
    B, S, W = 2, 11, 2
    spec = posattn.RopeSpec(96)
    q, k = torch.randn(B, S, 3, 96), torch.randn(B, S, 3, 96)
    pos = torch.randint(0, 5000, (B, S))
    fq, fk = posattn.apply_rope(q, k, pos, spec, backend="cpu")
    for r in range(W):
        lq, lk = (D.shard_tensor(x, W, r, shard=shard, dim=1) for x in (q, k))
        oq, ok = posattn.apply_rope(lq, lk, D.shard_positions(pos, W, r, shard=shard), spec, backend="cpu")
        assert_close(oq, D.shard_tensor(fq, W, r, shard=shard, dim=1))
        assert_close(ok, D.shard_tensor(fk, W, r, shard=shard, dim=1))


@pytest.mark.parametrize("call,err,words", [
    (lambda: D.shard_ranges(8, 2, 2), ValueError, "rank must be in [0, world_size = 2)"),
    (lambda: D.shard_ranges(8, 0, 0), ValueError, "world_size must be >= 1"),
    (lambda: D.shard_ranges(8, 2.0, 0), TypeError, "world_size must be an int"),
    (lambda: D.shard_ranges(8, 2, 0, "ring"), ValueError, "shard must be one of"),
    (lambda: D.shard_tensor(torch.zeros(4), 2, 0, dim=1), ValueError, "dim 1 is out of range"),
    (lambda: D.shard_tensor([1, 2], 2, 0), TypeError, "x must be a torch.Tensor"),
    (lambda: D.shard_positions(None, 2, 0), ValueError, "exactly one of positions and cu_seqlens"),
    (lambda: D.shard_positions(torch.zeros(4), 2, 0, cu_seqlens=torch.tensor([0, 4])), ValueError,
     "exactly one of"),
    (lambda: D.shard_positions(None, 2, 0, cu_seqlens=torch.tensor([0.0, 4.0])), ValueError,
     "cu_seqlens must be an int32/int64"),
    (lambda: D.shard_positions(torch.tensor(3), 2, 0), ValueError, "sequence dimension"),
])
def test_bad_input_names_the_argument(call, err, words):
    with pytest.raises(err) as e:
        call()
    assert words in str(e.value)

"""Sequence sharding: shard_ranges / shard_indices / shard_tensor / shard_positions, and RoPE on a
shard with its global positions equal to the unsharded rotation (bshd, packed thd with cu_seqlens)."""
import random

import pytest
import torch

import posattn
from posattn import distributed as D
from tests._tol import assert_close
from tests.attention.layouts import random_layout


@pytest.mark.parametrize("shard", ["zigzag", "contiguous", "zigzag_doc"])
@pytest.mark.parametrize("T,W", [(16, 2), (37, 4), (5, 4), (0, 2), (9, 1)])
def test_shards_partition_the_tokens(shard, T, W):
    cu = [0] + sorted(set(random.Random(T).sample(range(1, T), min(3, max(T - 1, 0))))) + [T] if T else [0, 0]
    idx = [D.shard_indices(T, W, r, shard, cu_seqlens=cu) for r in range(W)]
    assert sorted(torch.cat(idx).tolist()) == list(range(T))
    assert all(torch.equal(i, i.sort().values) for i in idx)          # ascending: local order is global order
    sizes = D.shard_sizes(T, W, shard, cu_seqlens=cu)
    assert [len(i) for i in idx] == sizes
    if shard != "zigzag_doc":
        assert max(sizes) - min(sizes) <= (2 if shard == "zigzag" else 1)


def test_zigzag_doc_holds_chunk_r_and_its_mirror_of_every_document():
    # documents of 8, 3 and 5 tokens, W = 2 (4 chunks a document): the 3-token one has an empty chunk
    cu = torch.tensor([0, 8, 11, 16], dtype=torch.int32)
    assert D.shard_ranges(16, 2, 0, "zigzag_doc", cu_seqlens=cu) == [(0, 2), (6, 8), (10, 12), (14, 16)]
    assert D.shard_ranges(16, 2, 1, "zigzag_doc", cu_seqlens=cu) == [(2, 6), (8, 10), (12, 14)]
    # rank 0's last chunk of a document and first chunk of the next are one range
    assert D.shard_ranges(8, 2, 0, "zigzag_doc", cu_seqlens=[0, 4, 8]) == [(0, 1), (3, 5), (7, 8)]
    assert D.shard_ranges(2, 4, 1, "zigzag_doc", cu_seqlens=[0, 2]) == [(0, 0)]        # no token
    x = torch.arange(16)
    assert D.shard_tensor(x, 2, 1, shard="zigzag_doc", cu_seqlens=cu).tolist() == [2, 3, 4, 5, 8, 9, 12, 13]


def test_zigzag_holds_chunk_r_and_its_mirror():
    assert D.shard_ranges(16, 4, 0, "zigzag") == [(0, 2), (14, 16)]
    assert D.shard_ranges(16, 4, 2, "zigzag") == [(4, 6), (10, 12)]
    assert D.shard_ranges(16, 4, 1, "contiguous") == [(4, 8)]


def test_shard_tensor_on_a_sequence_dimension():
    x = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    for r in range(2):
        part = D.shard_tensor(x, 2, r, shard="zigzag", dim=1)
        assert torch.equal(part, x[:, D.shard_indices(10, 2, r, "zigzag")])


@pytest.mark.parametrize("shard", ["zigzag", "contiguous", "zigzag_doc"])
def test_packed_positions_from_cu_seqlens_are_global(shard):
    """The Megatron bug class: a document crossing a shard boundary keeps counting on the next rank."""
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    full = torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6], dtype=torch.int32)
    for r in range(3):
        got = D.shard_positions(None, 3, r, shard=shard, cu_seqlens=cu)
        assert got.dtype == torch.int32
        assert torch.equal(got, full[D.shard_indices(13, 3, r, shard, cu_seqlens=cu)])
        assert torch.equal(D.shard_positions(full, 3, r, shard=shard, cu_seqlens=cu), got)


@pytest.mark.parametrize("shard", ["zigzag", "contiguous", "zigzag_doc"])
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
            lq, lk = (D.shard_tensor(x, W, r, shard=shard, cu_seqlens=cu) for x in (q, k))
            lpos = D.shard_positions(None, W, r, shard=shard, cu_seqlens=cu)
            if not lpos.numel():    # a rank without tokens (apply_rope's cpu kernel refuses 0 tokens)
                continue
            oq, ok = posattn.apply_rope(lq, lk, lpos, spec, layout="thd", backend="cpu")
            assert_close(oq, D.shard_tensor(fq, W, r, shard=shard, cu_seqlens=cu))
            assert_close(ok, D.shard_tensor(fk, W, r, shard=shard, cu_seqlens=cu))


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
    (lambda: D.shard_positions(None, 2, 0), ValueError, "pass positions, or cu_seqlens="),
    (lambda: D.shard_ranges(8, 2, 0, "zigzag_doc"), ValueError, 'shard="zigzag_doc" needs cu_seqlens='),
    (lambda: D.shard_ranges(8, 2, 0, "zigzag_doc", cu_seqlens=[0, 5]), ValueError, "from 0 to T = 8"),
    (lambda: D.shard_ranges(8, 2, 0, "zigzag_doc", cu_seqlens=[0, 6, 5, 8]), ValueError, "non-decreasing"),
    (lambda: D.shard_positions(torch.zeros(8), 2, 0, shard="zigzag_doc"), ValueError, "needs cu_seqlens="),
    (lambda: D.shard_positions(None, 2, 0, cu_seqlens=torch.tensor([0.0, 4.0])), ValueError,
     "cu_seqlens must be an int32/int64"),
    (lambda: D.shard_positions(torch.tensor(3), 2, 0), ValueError, "sequence dimension"),
])
def test_bad_input_names_the_argument(call, err, words):
    with pytest.raises(err) as e:
        call()
    assert words in str(e.value)

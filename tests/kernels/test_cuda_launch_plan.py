"""The CUDA launchers' host-side planning (csrc/include/posattn/cuda_launch.h), checked on
CPU through posattn._C: vector widths, grids for decode and for huge token counts, and
shared memory. The launches themselves run only on a GPU (benchmarks/gpu_check.sh)."""
import pytest


@pytest.fixture(scope="module")
def C():
    import importlib

    try:
        m = importlib.import_module("posattn._C")
    except ImportError:
        pytest.skip("posattn._C is not built")
    if not hasattr(m, "cuda_cos_sin_plan"):
        pytest.skip("posattn._C predates the launch-plan bindings (rebuild)")
    return m


H200_SMS = 132


def _view(ptr, heads, sb, ss, sh):
    return [ptr, ptr + (1 << 20), heads, sb, ss, sh, sb, ss, sh]


def test_pick_vec_ignores_strides_of_size_one_dims(C):
    # bf16 (2 bytes): 8 elements = 16 bytes at best
    base = 1 << 12
    assert C.cuda_pick_vec(2, 64, False, 2, 7, [_view(base, 4, 7 * 4 * 128, 4 * 128, 128)]) == 8
    # an odd batch stride matters when there are two batches...
    assert C.cuda_pick_vec(2, 64, False, 2, 7, [_view(base, 4, 3, 4 * 128, 128)]) == 1
    # ...and not when there is one (the index of a size-1 dim is always 0)
    assert C.cuda_pick_vec(2, 64, False, 1, 7, [_view(base, 4, 3, 4 * 128, 128)]) == 8
    # the same for the sequence (decode: S = 1) and the heads
    assert C.cuda_pick_vec(2, 64, False, 2, 1, [_view(base, 4, 4 * 128, 5, 128)]) == 8
    assert C.cuda_pick_vec(2, 64, False, 2, 7, [_view(base, 1, 7 * 128, 128, 9)]) == 8
    assert C.cuda_pick_vec(2, 64, False, 2, 7, [_view(base, 2, 7 * 256, 256, 9)]) == 1
    # a view with no heads (absent k) constrains nothing
    assert C.cuda_pick_vec(2, 64, False, 2, 7, [_view(base, 4, 7 * 512, 512, 128), _view(base + 2, 0, 1, 1, 1)]) == 8


def test_pick_vec_alignment_and_pairs(C):
    base = 1 << 12
    good = _view(base, 4, 7 * 4 * 128, 4 * 128, 128)
    # a pointer 8 bytes off: 4 bf16 elements
    assert C.cuda_pick_vec(2, 64, False, 1, 7, [_view(base + 8, 4, 7 * 4 * 128, 4 * 128, 128)]) == 4
    # half-split needs half % VEC == 0 (x2 = x + half must stay aligned)
    assert C.cuda_pick_vec(2, 20, False, 1, 7, [good]) == 4
    assert C.cuda_pick_vec(2, 3, False, 1, 7, [good]) == 1
    # interleaved: VEC/2 pairs per vector, so half % (VEC / 2); one pair at least, else scalar
    assert C.cuda_pick_vec(2, 4, True, 1, 7, [good]) == 8
    assert C.cuda_pick_vec(2, 3, True, 1, 7, [good]) == 2
    assert C.cuda_pick_vec(2, 3, True, 1, 7, [_view(base + 2, 4, 7 * 512, 512, 128)]) == 1
    # fp64: 2 elements; fp32: 4
    assert C.cuda_pick_vec(8, 40, False, 1, 7, [good]) == 2
    assert C.cuda_pick_vec(4, 40, False, 1, 7, [good]) == 4


def _check_covers(pl, tokens, heads):
    assert pl["tpb"] >= 1 and pl["hpb"] >= 1
    assert pl["token_blocks"] * pl["tpb"] >= tokens > (pl["token_blocks"] - 1) * pl["tpb"]
    assert pl["grid_y"] * pl["hpb"] >= heads > (pl["grid_y"] - 1) * pl["hpb"]
    assert 1 <= pl["grid_x"] <= 2**31 - 1 and pl["grid_y"] <= 65535
    assert 32 <= pl["threads"] <= 1024 and pl["threads"] % 32 == 0


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("heads, half, ppc", [(32 + 8, 64, 8), (64 + 8, 64, 8), (8 + 2, 32, 4), (4, 16, 8)])
def test_decode_sizes_spread_heads_over_blocks(C, tokens, heads, half, ppc):
    """<= 8 tokens never run on <= 8 CTAs (unless there are no more (token, head) pairs than
    that): the heads are split over blocks."""
    pl = C.cuda_cos_sin_plan(tokens, heads, half, 4, ppc, 256, H200_SMS)
    _check_covers(pl, tokens, heads)
    ctas = pl["grid_x"] * pl["grid_y"]
    assert ctas > 8 or ctas == tokens * heads, pl
    assert ctas >= min(H200_SMS, tokens * heads), pl  # as many as the work allows, up to the SMs
    hpb, threads = C.cuda_split_heads(tokens, heads, half // ppc, 128, H200_SMS)  # the rope kernel's
    assert tokens * -(-heads // hpb) >= min(H200_SMS, tokens * heads)
    assert 32 <= threads <= 128


def test_prefill_keeps_blocks_full(C):
    # many tokens, Llama-like heads: one token per block, at most two head groups of ~256 chunks
    pl = C.cuda_cos_sin_plan(4096, 40, 64, 4, 8, 256, H200_SMS)
    _check_covers(pl, 4096, 40)
    assert pl["tpb"] == 1 and pl["grid_y"] == 2 and pl["hpb"] == 20
    # few heads and pairs per token: several tokens per block
    pl = C.cuda_cos_sin_plan(4096, 4, 32, 4, 8, 256, H200_SMS)
    _check_covers(pl, 4096, 4)
    assert pl["tpb"] == 16 and pl["grid_y"] == 1 and pl["threads"] == 256


def test_huge_token_counts_stay_within_the_grid(C):
    """More token blocks than gridDim.x allows: the grid is capped and the kernel loops."""
    tokens = 3 * 2**31
    pl = C.cuda_cos_sin_plan(tokens, 64, 64, 4, 1, 256, H200_SMS)  # one token per block
    _check_covers(pl, tokens, 64)
    assert pl["tpb"] == 1
    assert pl["token_blocks"] > pl["grid_x"] == 2**31 - 1


@pytest.mark.parametrize("acc_bytes", [4, 8])
@pytest.mark.parametrize("half", [1, 8, 64, 128, 1024, 4096])
def test_shared_memory_budget(C, acc_bytes, half):
    """Table rows cached per block stay within 32 KiB (plus indices); a single row larger than
    the 48 KiB default is flagged so the launcher raises the kernel's limit first."""
    for tokens, heads in ((1, 1), (8, 40), (100000, 4), (100000, 64)):
        pl = C.cuda_cos_sin_plan(tokens, heads, half, acc_bytes, 1, 1024, H200_SMS)
        _check_covers(pl, tokens, heads)
        row = 4 * half * acc_bytes + 16
        assert pl["smem"] == pl["tpb"] * row
        assert pl["smem"] <= max(32 * 1024, row)
        assert pl["smem_attr"] == (pl["smem"] > 48 * 1024)
        if pl["tpb"] > 1:
            assert not pl["smem_attr"]


@pytest.mark.parametrize("tokens, heads, half, ppc, threads", [
    (1, 40, 64, 8, 256),      # decode, one token: heads split over blocks
    (8, 12, 48, 4, 128),      # decode-size batch
    (37, 5, 40, 2, 256),      # several tokens per block, a partial last block
    (300, 3, 24, 8, 64),      # interleaved-like chunks of 8 pairs, odd heads
    (64, 9, 10, 1, 1024),     # scalar, wide block
])
def test_every_pair_is_rotated_exactly_once(C, tokens, heads, half, ppc, threads):
    """Walk the CUDA cos/sin kernel's grid as it does (token blocks, head groups, work items
    e = threadIdx.x, += blockDim.x) with its own item decomposition (cos_sin_item, the
    function the kernel calls): every (token, head, pair) is covered exactly once."""
    pl = C.cuda_cos_sin_plan(tokens, heads, half, 4, ppc, threads, 16)
    _check_covers(pl, tokens, heads)
    cph = half // ppc
    seen = {}
    for y in range(pl["grid_y"]):
        h0 = y * pl["hpb"]
        nh = min(pl["hpb"], heads - h0)
        per_tok = nh * cph
        for x in range(pl["grid_x"]):
            for blk in range(x, pl["token_blocks"], pl["grid_x"]):
                tok0 = blk * pl["tpb"]
                ntb = min(pl["tpb"], tokens - tok0)
                for e in range(ntb * per_tok):
                    t, h, i0 = C.cuda_cos_sin_item(e, per_tok, cph, ppc, h0)
                    assert 0 <= t < ntb and h0 <= h < h0 + nh and i0 % ppc == 0
                    for i in range(i0, i0 + ppc):
                        k = (tok0 + t, h, i)
                        seen[k] = seen.get(k, 0) + 1
    assert len(seen) == tokens * heads * half
    assert set(seen.values()) == {1}

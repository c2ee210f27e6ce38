"""decode_attention on every backend against the independent fp64 oracle (tests/decode/_oracle.py).

Shapes stay tiny: the Triton backend runs in the interpreter on machines without a GPU.
"""
import pytest
import torch

import posattn
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.decode._oracle import Case

BACKENDS = usable_backends("decode_attention")
ROPE = posattn.RopeSpec(16, rotary_dim=12)


def run_case(case: Case, backend: str, num_splits=None, kind="attention"):
    args, kw = case.args()
    out, lse = posattn.decode_attention(*args, **kw, return_lse=True, num_splits=num_splits, backend=backend)
    ref_out, ref_lse, ref_kc, ref_vc = case.oracle()
    T = sum(case.q_lens)
    out = out.reshape(T, case.HQ, case.D)
    lse = lse.reshape(T, case.HQ)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, case.dtype, kind, msg=f"out ({backend})")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), "lse: -inf exactly where no key is visible"
    lse_dtype = torch.float32 if case.dtype == torch.float64 else case.dtype     # lse is fp32 on every backend
    assert_close(lse.cpu()[fin], ref_lse[fin], lse_dtype, kind, msg=f"lse ({backend})")
    if case.k is not None:   # the new tokens were written where the oracle wrote them, nothing else changed
        # (rotated k may differ from the oracle's fp64 rotation by one rounding)
        assert_close(args[1].cpu(), ref_kc, case.dtype, "elementwise", msg="k_cache after the append")
        assert torch.equal(args[2].cpu(), ref_vc), "v_cache after the append"
    return out, lse


CASES = {
    # name: Case kwargs
    "decode_contig": dict(q_lens=[1, 1, 1], cached=[5, 0, 12]),
    "decode_paged_ps1": dict(q_lens=[1, 1], cached=[6, 3], page_size=1),
    "decode_paged_ps3_shared": dict(q_lens=[1, 1], cached=[9, 7], page_size=3, shared=True),
    "gqa3_hd80": dict(q_lens=[2, 1], cached=[5, 4], HQ=6, HK=2, D=80, page_size=4),
    "mha3_hd96": dict(q_lens=[3], cached=[4], HQ=3, HK=3, D=96, page_size=5),
    "hd64_ps256": dict(q_lens=[1, 2], cached=[300, 20], HQ=4, HK=1, D=64, page_size=256),
    "hd128": dict(q_lens=[2, 1], cached=[9, 33], HQ=8, HK=2, D=128, page_size=16),
    "hd192": dict(q_lens=[1, 3], cached=[6, 2], HQ=2, HK=1, D=192, page_size=8, tree=True),
    "hd256": dict(q_lens=[2, 1], cached=[3, 7], HQ=2, HK=2, D=256, page_size=4),
    "ragged_empty": dict(q_lens=[3, 0, 7, 1], cached=[2, 5, 0, 9], page_size=4),
    "padded_chunk": dict(q_lens=[3, 3], cached=[4, 0], padded=True, page_size=2),
    "non_causal": dict(q_lens=[4, 2], cached=[3, 1], causal=False, page_size=4),
    "tree": dict(q_lens=[7, 5], cached=[6, 3], tree=True, page_size=4),
    "tree_wide": dict(q_lens=[40, 3], cached=[2, 1], tree=True, page_size=8, HQ=2, HK=1, D=8),
    "window": dict(q_lens=[3, 1], cached=[9, 4], window=4, page_size=2),
    "window_tree": dict(q_lens=[5, 2], cached=[7, 3], window=3, tree=True),
    "append": dict(q_lens=[2, 1, 0], cached=[3, 6, 2], append=True, page_size=3),
    "append_contig_padded": dict(q_lens=[2, 2], cached=[3, 0], append=True, padded=True),
    "rope_append": dict(q_lens=[3, 1], cached=[4, 2], append=True, rope=ROPE, page_size=4),
    "rope_append_tree": dict(q_lens=[5, 3], cached=[4, 2], append=True, rope=ROPE, tree=True, page_size=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle(name, backend):
    run_case(Case(**CASES[name], device=DEVICE, seed=hash(name) % 1000), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype, backend):
    run_case(Case(q_lens=[2, 1], cached=[7, 3], page_size=4, dtype=dtype, append=True, device=DEVICE), backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_num_splits(splits, backend):
    """Split-KV merges: any split count gives the same result (empty splits included)."""
    run_case(Case(q_lens=[1, 2, 1], cached=[13, 2, 0], page_size=4, tree=True, device=DEVICE), backend,
             num_splits=splits)


def test_float64_reference():
    case = Case(q_lens=[2, 1], cached=[3, 4], page_size=2, dtype=torch.float64, tree=True, device=DEVICE)
    run_case(case, "reference")


def test_output_shapes_padded_and_ragged():
    case = Case(q_lens=[2, 2], cached=[1, 3], padded=True, device=DEVICE)
    args, kw = case.args()
    out = posattn.decode_attention(*args, **kw, backend="reference")
    assert out.shape == (2, 2, 4, 16)
    out, lse = posattn.decode_attention(*args, **kw, backend="reference", return_lse=True)
    assert lse.shape == (2, 2, 4)
    case = Case(q_lens=[2, 0, 1], cached=[1, 3, 0], device=DEVICE)
    args, kw = case.args()
    out, lse = posattn.decode_attention(*args, **kw, backend="reference", return_lse=True)
    assert out.shape == (3, 4, 16) and lse.shape == (3, 4)


def test_cache_seqlens_not_changed():
    case = Case(q_lens=[1, 1], cached=[2, 3], append=True, device=DEVICE)
    args, kw = case.args()
    before = case.cache_seqlens.clone()
    posattn.decode_attention(*args, **kw)
    assert torch.equal(case.cache_seqlens, before)


def _random_case(seed: int) -> Case:
    import random

    rng = random.Random(seed)
    HK = rng.choice([1, 2, 3])
    G = rng.choice([1, 2, 4])
    B = rng.randint(1, 4)
    q_lens = [rng.choice([0, 1, 1, 2, 3, 7]) for _ in range(B)]
    if not sum(q_lens):
        q_lens[0] = 1
    tree = rng.random() < 0.4
    return Case(q_lens=q_lens, cached=[rng.randint(0, 40) for _ in range(B)], HQ=HK * G, HK=HK,
                D=rng.choice([8, 16, 80, 96]), page_size=rng.choice([None, 1, 3, 4, 16]), tree=tree,
                causal=rng.random() < 0.8, window=rng.choice([None, None, 5, 17]), append=rng.random() < 0.5,
                shared=rng.random() < 0.5, seed=seed, device=DEVICE,
                dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(10))
def test_random_shapes(seed, backend):
    """Random batches: GQA groups, head dims 8-96, page sizes 1-16 or contiguous, ragged q with
    empty requests, trees, windows, appends, shared pages, all three dtypes; random split counts."""
    case = _random_case(seed)
    splits = None if backend == "reference" or seed % 2 else 1 + seed % 4
    run_case(case, backend, num_splits=splits)


def test_default_backend_choice():
    """CPU tensors: the C++ kernel (the interpreter only when asked by name); CUDA tensors: Triton."""
    from posattn import dispatch
    from posattn.decode.attention import DecodeKey

    key = DecodeKey("cpu", "bfloat16", 128, 32, 8, 16, True, False, True, False, 1, 4096, 4)
    assert dispatch.select("decode_attention", key)[0].backend == "cpu"
    assert dispatch.select("decode_attention", DecodeKey(**dict(key.__dict__, dtype="float64")))[0].backend == \
        "reference"
    from posattn.kernels import triton as tk

    if torch.cuda.is_available() and tk.device_ok("cuda"):
        gkey = DecodeKey(**dict(key.__dict__, device_type="cuda"))
        assert dispatch.select("decode_attention", gkey)[0].backend == "triton"


@pytest.mark.skipif(DEVICE != "cuda", reason="a cache beyond 2^31 elements needs a GPU's memory")
def test_offsets_beyond_int32():
    """Pages past element 2^31 of the cache (a review finding: 32-bit head offsets overflow)."""
    HK, D, ps = 8, 128, 16
    nb = (1 << 31) // (ps * HK * D) + 8
    kc = torch.zeros(nb, ps, HK, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    pages = torch.arange(nb - 4, nb, dtype=torch.int32, device="cuda")
    kc[pages.long()] = torch.randn(4, ps, HK, D, device="cuda").to(torch.bfloat16)
    vc[pages.long()] = torch.randn(4, ps, HK, D, device="cuda").to(torch.bfloat16)
    bt = pages[None].flip(1).contiguous()
    q = torch.randn(1, 1, 32, D, device="cuda").to(torch.bfloat16)
    cs = torch.tensor([4 * ps - 1], dtype=torch.int32, device="cuda")
    out = posattn.decode_attention(q, kc, vc, cs, block_table=bt, backend="triton")
    ref = posattn.decode_attention(q, kc[bt[0].long()].reshape(1, 4 * ps, HK, D).clone(),
                                   vc[bt[0].long()].reshape(1, 4 * ps, HK, D).clone(), cs, backend="reference")
    assert_close(out, ref, torch.bfloat16, "attention")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Caches stored head-major ([blocks, Hk, page, D] viewed as [blocks, page, Hk, D]) and q a
    strided view: read in place, written in place by the append."""
    case = Case(q_lens=[2, 1, 3], cached=[5, 0, 9], page_size=4, append=True, tree=True, device=DEVICE)
    case.k_cache = case.k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    case.v_cache = case.v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    big = torch.randn(case.q.shape[0], case.HQ, 2 * case.D, device=DEVICE).to(case.dtype)
    big[..., :case.D] = case.q
    case.q = big[..., :case.D]
    assert not case.q.is_contiguous() and not case.k_cache.is_contiguous()
    run_case(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_rope_with_positions(backend):
    case = Case(q_lens=[3, 3], cached=[4, 1], padded=True, append=True, rope=ROPE, page_size=2, device=DEVICE,
                seed=3)
    case.positions = torch.tensor([[4, 5, 5], [1, 2, 3]], device=DEVICE).reshape(-1)
    run_case(case, backend)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tree", [False, True])
def test_cuda_graph_replay_follows_new_lengths(tree):
    """A planned decode step captured in a CUDA graph replays with new cache lengths and queries
    written into the captured tensors (the launch depends on shapes only)."""
    case = Case(q_lens=[2, 1, 2], cached=[5, 9, 2], page_size=4, tree=tree, device="cuda", dtype=torch.bfloat16,
                extra_pages=8)
    args, kw = case.args()
    posattn.decode_attention(*args, **kw, backend="triton")          # the checked call keeps the plan
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        posattn.decode_attention(*args, **kw, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = posattn.decode_attention(*args, **kw, backend="triton")
    case.cached = [7, 3, 6]
    case.cache_seqlens.copy_(torch.tensor(case.cached, dtype=torch.int32))
    case.q.copy_(torch.randn_like(case.q, dtype=torch.float32).to(case.q.dtype))
    args[1].copy_(case.k_cache)   # the captured caches hold the data the oracle reads
    args[2].copy_(case.v_cache)
    graph.replay()
    torch.cuda.synchronize()
    ref_out = case.oracle()[0]
    assert_close(out, ref_out, case.dtype, "attention")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [None, 3])
def test_query_that_sees_nothing(backend, splits):
    """A tree row with no bit over an empty cache: out = 0 and lse = -inf, also through the split merge."""
    case = Case(q_lens=[3, 2], cached=[0, 4], page_size=2, tree=True, device=DEVICE)
    case.tree_mask[1] = 0
    case.tree_rows[1] = [False] * len(case.tree_rows[1])
    out, lse = run_case(case, backend, num_splits=None if backend == "reference" else splits)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu())) and bool(torch.isinf(lse[1]).all())


SPARSE = {
    "kv_lists_decode": dict(q_lens=[1, 1, 1], cached=[20, 7, 0], page_size=4, indexed="kv", HQ=4, HK=2),
    "q_lists_decode": dict(q_lens=[1, 1], cached=[13, 30], page_size=3, indexed="q", HQ=6, HK=2, budget=9),
    "kv_lists_tree_window": dict(q_lens=[5, 2], cached=[17, 9], tree=True, window=12, indexed="kv", page_size=2),
    "q_lists_chunk_append": dict(q_lens=[3, 0, 2], cached=[8, 3, 11], append=True, indexed="q", HQ=4, HK=1),
    "kv_lists_budget_beyond": dict(q_lens=[1, 2], cached=[5, 6], indexed="kv", budget=16, page_size=1),
    # odd sizes (issue 13): 3 query heads on one KV head, head_dim 80 / 96, 7 cached tokens
    "q_lists_hq3_hd80": dict(q_lens=[1, 1], cached=[7, 13], indexed="q", HQ=3, HK=1, D=80, page_size=5),
    "kv_lists_hq3_hd96": dict(q_lens=[1], cached=[7], indexed="kv", HQ=3, HK=3, D=96, budget=5, page_size=7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_kv_indices(name, backend):
    """kv_indices (token selection's sparse decode): each head sees only its listed cached slots
    (any order, -1 anywhere) plus the step's new tokens; per KV head or per query head lists."""
    run_case(Case(**SPARSE[name], device=DEVICE, seed=len(name)), backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("splits", [2, 5])
def test_sparse_kv_indices_split(backend, splits):
    run_case(Case(q_lens=[1, 2], cached=[25, 14], indexed="q", HQ=4, HK=2, page_size=4, tree=True,
                  device=DEVICE), backend, num_splits=splits)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("indexed,HQ,HK", [("kv", 6, 2), ("q", 3, 1)])
def test_sparse_lists_over_many_blocks(backend, threads, indexed, HQ, HK):
    """Lists longer than the CPU kernel's 64-slot key block (its prefetch runs one block ahead,
    into the next list at a list's end; one thread takes one split), 3 rows per list, bf16."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_case(Case(q_lens=[1, 1], cached=[300, 170], page_size=16, indexed=indexed, HQ=HQ, HK=HK, budget=150,
                      dtype=torch.bfloat16, device=DEVICE, seed=threads), backend)
    finally:
        torch.set_num_threads(old)


def test_all_slots_listed_equals_dense():
    """Listing every cached slot is dense attention (issue 13's budget >= context)."""
    case = Case(q_lens=[1, 1], cached=[9, 4], page_size=4, device=DEVICE)
    args, kw = case.args()
    dense = posattn.decode_attention(*args, **kw)
    idx = torch.full((2, case.HK, 12), -1, dtype=torch.int32)
    for b, L in enumerate(case.cached):
        idx[b, :, :L] = torch.randperm(L, dtype=torch.int32)
    for backend in BACKENDS:
        out = posattn.decode_attention(*args, **kw, kv_indices=idx.to(DEVICE), backend=backend)
        assert_close(out, dense, case.dtype, "attention", msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_random_long_contexts(seed, backend):
    """Contexts of up to 300 slots (many key blocks per split: the online-softmax rescaling), page
    sizes 7-64, sparse lists, windows past a block, all split counts."""
    import random

    rng = random.Random(1000 + seed)
    HK, G = rng.choice([1, 2]), rng.choice([1, 4])
    B = rng.randint(1, 3)
    q_lens = [rng.choice([0, 1, 3, 9]) for _ in range(B)]
    q_lens[0] = max(q_lens[0], 1)
    case = Case(q_lens=q_lens, cached=[rng.randint(100, 300) for _ in range(B)], HQ=HK * G, HK=HK, D=64,
                page_size=rng.choice([None, 7, 16, 64]), tree=rng.random() < 0.5, window=rng.choice([None, 130]),
                append=rng.random() < 0.5, dtype=rng.choice([torch.float32, torch.bfloat16]), seed=seed,
                indexed=rng.choice(["", "kv", "q"]), device=DEVICE)
    run_case(case, backend, num_splits=None if backend == "reference" else rng.choice([None, 1, 2, 7]))

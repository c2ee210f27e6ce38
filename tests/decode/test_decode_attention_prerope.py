"""decode_attention over pre-RoPE caches (key_positions): every backend against the independent
fp64 oracle of tests/decode/_oracle_rot.py, and against decode over the rotated cache.

Shapes stay tiny: the Triton backend runs in the interpreter on machines without a GPU.
"""
import pytest
import torch

import posattn
from posattn.kernels.reference import rope as ref_rope
from tests._tol import assert_close
from tests.conftest import DEVICE, usable_backends
from tests.decode._oracle import Case
from tests.decode._oracle_rot import oracle

BACKENDS = usable_backends("decode_attention")
ROPE = posattn.RopeSpec(16, rotary_dim=12)


def oracle_rounding(backend: str, dtype, qk_precision: str = "bf16"):
    """What the backend multiplies: Triton with "bf16" rounds the rotated q/k to a 16-bit dtype;
    the C++ path (fp32) and the reference (fp64) do not."""
    if backend == "triton" and qk_precision == "bf16" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return None


def key_positions_for(case: Case, kind: str, offset: int = 0):
    S = case.capacity
    if kind == "slots":
        return "slots"
    g = torch.Generator().manual_seed(7)
    if kind == "BS":     # per request: increasing, with gaps, from an offset
        kp = offset + torch.cumsum(torch.randint(1, 3, (case.B, S), generator=g), 1)
        return kp.to(torch.int64).to(DEVICE)
    if kind == "S_int32":
        return (offset + torch.arange(S) * 2).to(torch.int32).to(DEVICE)
    if kind == "S_float":
        return (offset + torch.arange(S, dtype=torch.float32) * 1.5 + 0.25).to(DEVICE)
    raise ValueError(kind)


def run_rot(case: Case, backend: str, key_positions, position_map=None, qk_precision="bf16", num_splits=None):
    args, kw = case.args()
    out, lse = posattn.decode_attention(*args, **kw, key_positions=key_positions, position_map=position_map,
                                        qk_precision=qk_precision, return_lse=True, num_splits=num_splits,
                                        backend=backend)
    ref_out, ref_lse, ref_kc, ref_vc = oracle(case, key_positions, position_map,
                                              oracle_rounding(backend, case.dtype, qk_precision))
    T = sum(case.q_lens)
    out, lse = out.reshape(T, case.HQ, case.D), lse.reshape(T, case.HQ)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, case.dtype, "attention", msg=f"out ({backend})")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), "lse: -inf exactly where no key is visible"
    assert_close(lse.cpu()[fin], ref_lse[fin], case.dtype, "attention", msg=f"lse ({backend})")
    if case.k is not None:   # the new keys are written as given (before RoPE)
        assert torch.equal(args[1].cpu(), ref_kc), "k_cache after the append: unrotated new keys"
        assert torch.equal(args[2].cpu(), ref_vc), "v_cache after the append"
    return out, lse


CASES = {
    "contig_slots": (dict(q_lens=[1, 1, 1], cached=[5, 0, 12]), "slots"),
    "paged_append_slots": (dict(q_lens=[3, 1], cached=[4, 2], append=True, page_size=4), "slots"),
    "gqa3_hd80_BS": (dict(q_lens=[2, 1], cached=[5, 4], HQ=6, HK=2, D=80, page_size=4), "BS"),
    "mha3_hd96_7tok": (dict(q_lens=[7], cached=[4], HQ=3, HK=3, D=96, page_size=5, append=True), "S_int32"),
    "tree_float_pos": (dict(q_lens=[5, 3], cached=[4, 2], append=True, tree=True, page_size=2), "S_float"),
    "window_contig": (dict(q_lens=[3, 1], cached=[9, 4], window=4), "slots"),
    "idx_kv": (dict(q_lens=[1, 2], cached=[9, 6], page_size=4, indexed="kv"), "BS"),
    "idx_q_tree": (dict(q_lens=[3, 2], cached=[7, 5], page_size=3, indexed="q", tree=True, HQ=4, HK=2), "slots"),
    "interleaved": (dict(q_lens=[2, 1], cached=[6, 3], page_size=4, append=True), "slots"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_prerope_matches_oracle(name, backend):
    kw, kind = CASES[name]
    D = kw.get("D", 16)
    rope = posattn.RopeSpec(D, rotary_dim=D - 4, interleaved=name == "interleaved")
    case = Case(**kw, rope=rope, device=DEVICE, seed=hash(name) % 1000)
    run_rot(case, backend, key_positions_for(case, kind))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prerope_dtypes(dtype, backend):
    case = Case(q_lens=[2, 1], cached=[7, 3], page_size=4, dtype=dtype, append=True, rope=ROPE, device=DEVICE)
    run_rot(case, backend, "slots")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("splits", [1, 3])
def test_prerope_num_splits(splits, backend):
    case = Case(q_lens=[1, 2, 1], cached=[13, 2, 0], page_size=4, tree=True, rope=ROPE, device=DEVICE)
    run_rot(case, backend, "slots", num_splits=splits)


def _rotated_copy(case: Case, k_cache: torch.Tensor) -> torch.Tensor:
    """The cache a rotating rope_and_cache would have written: each slot's key rotated at its slot
    position (exact fp64 angles), rounded once to the cache dtype."""
    out = k_cache.clone().cpu()
    bt = case.block_table.cpu() if case.block_table is not None else None
    tables = case.rope.tables("cpu", None)
    for b in range(case.B):
        for j in range(case.capacity):
            pg, off = (b, j) if bt is None else (int(bt[b, j // case.page_size]), j % case.page_size)
            ang = ref_rope.rope_angles(torch.tensor([[[j]]], dtype=torch.float64), tables, True)
            x = ref_rope.rotate(k_cache.cpu()[pg, off][None, None], ang, case.rope.rotary_dim,
                                case.rope.interleaved, tables.attention_scaling)
            out[pg, off] = x[0, 0].to(k_cache.dtype)
    return out.to(k_cache.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", ["plain", "tree", "idx"])
def test_prerope_equals_rotated_cache(extra, dtype, backend):
    """Without a map, a pre-RoPE cache gives the rotated cache's result (within the rounding of
    the rotated cache to the dtype), with kv_indices and tree masks too."""
    case = Case(q_lens=[3, 1], cached=[6, 9], page_size=4, dtype=dtype, rope=ROPE, device=DEVICE,
                tree=extra == "tree", indexed="kv" if extra == "idx" else "", seed=3)
    case.positions = None
    args, kw = case.args()
    pre = posattn.decode_attention(*args, **kw, key_positions="slots", return_lse=True, backend=backend)
    rot_cache = _rotated_copy(case, args[1])
    args2 = (args[0], rot_cache, args[2], args[3])
    post = posattn.decode_attention(*args2, **kw, return_lse=True, backend=backend)
    assert_close(pre[0], post[0], dtype, "attention", msg="out: pre-RoPE vs rotated cache")
    assert_close(pre[1], post[1], dtype, "attention", msg="lse: pre-RoPE vs rotated cache")


def test_key_positions_tensor_default_query_position():
    """With a key_positions tensor, a query sits at its own slot's key position by default."""
    case = Case(q_lens=[2], cached=[3], page_size=4, rope=ROPE, device=DEVICE, append=True)
    case.positions = None
    kp = key_positions_for(case, "BS", offset=100)
    run_rot(case, "reference", kp)
    args, kw = case.args()
    kw["positions"] = kp[0, 3:5].to(torch.int64)
    a = posattn.decode_attention(*args, **kw, key_positions=kp, backend="reference")
    args, kw = case.args()
    b = posattn.decode_attention(*args, **kw, key_positions=kp, backend="reference")
    assert torch.equal(a, b)

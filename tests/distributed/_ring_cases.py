"""Cases of context-parallel anchor attention, run on every rank (see test_ring.py)."""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

import posattn
from posattn import distributed as D
from tests._tol import assert_within
from tests.attention import oracle
from tests.attention.layouts import random_layout


def random_cases(seed: int, n: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        T = rng.randint(8, 56)
        na = rng.choice([0, 1, 2, 3])
        n_rows = rng.randint(1, 3)
        while T < n_rows * max(1, na):
            n_rows -= 1
        cu, rows = random_layout(rng, T, n_rows, na, max_docs=rng.randint(1, 6))
        HQ, HK = rng.choice([(3, 1), (4, 2), (2, 2)])
        out.append(dict(cu=cu, rows=rows, na=na, causal=rng.random() < 0.7, window=rng.choice([None, 3, 9]),
                        shard=("zigzag", "contiguous", "zigzag_doc")[i % 3], HQ=HQ, HK=HK, D=rng.choice([16, 80]),
                        rope=rng.random() < 0.5, seed=rng.randint(0, 10 ** 6), strided=i % 4 == 1,
                        engine=("torch", "torch", "kernel", "kernel")[i % 4]))
    return out


def run_case(rank, world, c):
    """One case: the CP op's out, lse, dq, dk, dv equal the single-process op's rows of this rank."""
    g = torch.Generator().manual_seed(c["seed"])
    cu, rows, T = c["cu"], c["rows"], int(c["cu"][-1])
    q = torch.randn(T, c["HQ"], c["D"], generator=g)
    k = torch.randn(T, c["HK"], c["D"], generator=g)
    v = torch.randn(T, c["HK"], c["D"], generator=g)
    dout = torch.randn(T, c["HQ"], c["D"], generator=g)
    dlse = torch.randn(c["HQ"], T, generator=g)
    kw = dict(cu_rows=rows, num_anchors=c["na"], causal=c["causal"], window=c["window"], return_lse=True)
    spec = posattn.RopeSpec(c["D"], rotary_dim=c["D"] // 2) if c["rope"] else None
    pos = D.shard_positions(None, 1, 0, cu_seqlens=cu) if spec else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = posattn.anchor_attention(*leaves, cu, rope=spec, positions=pos, backend="cpu", **kw)
    torch.autograd.backward([out, lse], [dout, dlse])

    sh = c["shard"]
    part = lambda x, dim=0: D.shard_tensor(x, world, rank, shard=sh, dim=dim, cu_seqlens=cu)  # noqa: E731
    Dh = c["D"]
    if c.get("strided"):     # q, k, v and dout with a row stride of 2 D (last dimension contiguous)
        big = [torch.cat((part(x), part(x)), -1).requires_grad_(True) for x in (q, k, v)]
        ins = [b[..., :Dh] for b in big]
        ldout = torch.cat((part(dout), part(dout)), -1)[..., :Dh]
    else:
        big = ins = [part(x).clone().requires_grad_(True) for x in (q, k, v)]
        ldout = part(dout)
    lpos = D.shard_positions(None, world, rank, shard=sh, cu_seqlens=cu) if spec else None
    lo, ll = D.anchor_attention(*ins, cu, rope=spec, positions=lpos, shard=sh, block_engine=c.get("engine", "auto"),
                                **kw)
    torch.autograd.backward([lo, ll], [ldout, part(dlse, 1)])
    my_grads = [b.grad[..., :Dh] for b in big]
    what = f"rank {rank}/{world} case {c}"
    # the fp64 oracle and the elementwise error bounds of an fp32 kernel (tests/attention/oracle.py):
    # the CP op is within them of the oracle, hence within twice them of the single-process op
    ra = (pos, spec.inv_freq(), spec.rotary_dim, spec.interleaved, spec.attention_scaling) if spec else None
    r_out, r_lse, r_grads, bnd = oracle.run(q, k, v, cu, rows, c["na"], c["causal"], c["window"], rope=ra,
                                            dout=dout, dlse=dlse, with_bounds=True)
    b_out, b_lse, b_dq, b_dk, b_dv = bnd
    got = [(lo, out, r_out, b_out, 0, "out"), (ll, lse, r_lse, b_lse, 1, "lse")]
    got += [(a, b.grad, r, bd, 0, f"d{n}") for n, a, b, r, bd in zip("qkv", my_grads, leaves, r_grads,
                                                                       (b_dq, b_dk, b_dv))]
    for cp, single, ref, bound, dim, name in got:
        assert_within(cp, part(ref, dim), part(bound, dim), msg=f"{name} vs the fp64 oracle: {what}")
        assert_within(cp, part(single.detach(), dim), 2 * part(bound, dim), msg=f"{name} vs the op: {what}")
    # the gathered output is the single-process output on every rank
    assert_within(D.gather_tensor(lo.detach(), T, shard=sh, cu_seqlens=cu), out.detach(), 2 * b_out, msg=f"gathered out: {what}")


def bad_inputs(rank, world):
    """Errors that need a process group: they name the argument and what was expected."""
    import pytest

    T = 10
    cu = torch.tensor([0, T], dtype=torch.int32)
    Tl = D.shard_sizes(T, world)[rank]
    q = torch.zeros(Tl, 2, 16)
    with pytest.raises(ValueError, match=f"q has {Tl + 1} tokens but rank {rank}'s zigzag shard"):
        D.anchor_attention(torch.zeros(Tl + 1, 2, 16), torch.zeros(Tl + 1, 2, 16), torch.zeros(Tl + 1, 2, 16), cu)
    with pytest.raises(ValueError, match="positions were given without rope"):
        D.anchor_attention(q, q, q, cu, positions=torch.zeros(Tl))
    with pytest.raises(ValueError, match=r"positions \[T_local\] .* are required with rope"):
        D.anchor_attention(q, q, q, cu, rope=posattn.RopeSpec(16))
    with pytest.raises(ValueError, match="cu_seqlens must be an int32 1-D tensor"):
        D.anchor_attention(q, q, q, cu.long())
    with pytest.raises(ValueError, match="must start at 0 and end at T"):
        D.anchor_attention(q, q, q, cu, cu_rows=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_anchors"):
        D.anchor_attention(q, q, q, cu, num_anchors=-1)
    with pytest.raises(ValueError, match="block_engine must be one of"):
        D.anchor_attention(q, q, q, cu, block_engine="triton")
    with pytest.raises(ValueError, match=r"block_engine='kernel' runs posattn's C\+\+ CPU kernel"):
        D.anchor_attention(q.double(), q.double(), q.double(), cu, block_engine="kernel")


def ring_cases(rank, world, seed, n):
    from posattn.distributed import _local

    bad_inputs(rank, world)

    tile = _local.TILE
    for i, c in enumerate(random_cases(seed, n)):
        _local.TILE = (tile, 5)[i % 2]          # odd cases: several query tiles per block (torch engine)
        run_case(rank, world, c)
    _local.TILE = tile
    no_remote_block(rank, world)
    if world >= 3:
        empty_rank(rank, world)


def no_remote_block(rank, world):
    """Every document inside one shard: no rank sees another's block, no K/V is sent at all,
    and the result is still the single-process op's (the anchors come from the all_gather)."""
    T = 8 * world
    sizes = D.shard_sizes(T, world, "contiguous")
    cu = torch.tensor([0] + [sum(sizes[:r + 1]) for r in range(world)], dtype=torch.int32)
    cu = torch.unique(torch.cat((cu, torch.tensor([3, 5, 8 + 2], dtype=torch.int32)))).to(torch.int32)
    rows = torch.tensor([0, T], dtype=torch.int32)
    plan = D.plan_ring(cu, rows, 2, True, None, world, "contiguous")
    assert not any(plan.visible[r][s] for r in range(world) for s in range(world) if r != s)
    sent = []
    real_isend = dist.isend
    dist.isend = lambda *a, **k: sent.append(1) or real_isend(*a, **k)
    try:
        for engine in ("torch", "kernel"):
            run_case(rank, world, dict(cu=cu, rows=rows, na=2, causal=True, window=None, shard="contiguous", HQ=2,
                                       HK=1, D=16, rope=True, seed=7, engine=engine))
    finally:
        dist.isend = real_isend
    assert not sent, f"rank {rank} sent {len(sent)} K/V blocks that nobody can see"


def empty_rank(rank, world):
    """Fewer tokens than chunks: some ranks hold no token at all (and one long document crosses all)."""
    for sh in ("zigzag", "contiguous", "zigzag_doc"):        # zigzag_doc: both documents shorter than 2W
        cu = torch.tensor([0, 1, 5], dtype=torch.int32)
        for engine in ("torch", "kernel"):
            run_case(rank, world, dict(cu=cu, rows=torch.tensor([0, 5], dtype=torch.int32), na=1, causal=True,
                                       window=None, shard=sh, HQ=3, HK=1, D=16, rope=True, seed=3, engine=engine))

"""Cases of context-parallel anchor attention, run on every rank (see test_ring.py)."""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

import posattn
from posattn import distributed as D
from tests._tol import assert_close
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
                        shard=("zigzag", "contiguous")[i % 2], HQ=HQ, HK=HK, D=rng.choice([16, 80]),
                        rope=rng.random() < 0.5, seed=rng.randint(0, 10 ** 6)))
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
    part = lambda x, dim=0: D.shard_tensor(x, world, rank, shard=sh, dim=dim)  # noqa: E731
    mine = [part(x).clone().requires_grad_(True) for x in (q, k, v)]
    lpos = D.shard_positions(None, world, rank, shard=sh, cu_seqlens=cu) if spec else None
    lo, ll = D.anchor_attention(*mine, cu, rope=spec, positions=lpos, shard=sh, **kw)
    torch.autograd.backward([lo, ll], [part(dout), part(dlse, 1)])
    what = f"rank {rank}/{world} case {c}"
    assert_close(lo, part(out), kind="attention", msg=f"out: {what}")
    assert_close(ll, part(lse, 1), kind="attention", msg=f"lse: {what}")
    for name, a, b in zip("qkv", mine, leaves):
        assert_close(a.grad, part(b.grad), kind="attention_grad", msg=f"d{name}: {what}")
    # the gathered output is the single-process output on every rank
    assert_close(D.gather_tensor(lo.detach(), T, shard=sh), out.detach(), kind="attention")


def ring_cases(rank, world, seed, n):
    for c in random_cases(seed, n):
        run_case(rank, world, c)
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
        run_case(rank, world, dict(cu=cu, rows=rows, na=2, causal=True, window=None, shard="contiguous", HQ=2,
                                   HK=1, D=16, rope=True, seed=7))
    finally:
        dist.isend = real_isend
    assert not sent, f"rank {rank} sent {len(sent)} K/V blocks that nobody can see"


def empty_rank(rank, world):
    """Fewer tokens than chunks: some ranks hold no token at all (and one long document crosses all)."""
    for sh in ("zigzag", "contiguous"):
        cu = torch.tensor([0, 1, 5], dtype=torch.int32)
        run_case(rank, world, dict(cu=cu, rows=torch.tensor([0, 5], dtype=torch.int32), na=1, causal=True,
                                   window=None, shard=sh, HQ=3, HK=1, D=16, rope=True, seed=3))

"""DTensor cases of the decode ops, run on every rank (see test_dtensor.py): head- and
batch-sharded decode_attention, head-sharded rope_and_cache and kv_compact equal the local ops on
the full tensors (outputs and the caches they write); unsupported placements raise an error
naming them."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

import posattn
from tests._tol import assert_close
from tests.distributed._dtensor_cases import _raises

R = Replicate()


def _dist(mesh, x, p):
    """x as a DTensor placed p (None: x stays a plain tensor), or None."""
    return None if x is None or p is None else distribute_tensor(x, mesh, [p])


def _same(a, b, what):
    a = a.full_tensor() if hasattr(a, "full_tensor") else a
    if a.dtype.is_floating_point:
        assert_close(a, b, msg=what)
    else:
        assert torch.equal(a, b), (what, a, b)


def _decode(mesh, full, places, what, **kw):
    """decode_attention on the full tensors and on DTensors placed by ``places`` (name -> placement;
    absent: plain): equal out, lse, and caches after the call (k/v written)."""
    ref = {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in full.items()}
    r_out, r_lse = posattn.decode_attention(ref.pop("q"), ref.pop("k_cache"), ref.pop("v_cache"), ref.pop("cache_seqlens"),
                                            **ref, return_lse=True, backend="cpu", **kw)
    d = {n: (_dist(mesh, x.clone(), places[n]) if n in places else x) for n, x in full.items()}
    kc, vc = d["k_cache"], d["v_cache"]
    out, lse = posattn.decode_attention(d.pop("q"), d.pop("k_cache"), d.pop("v_cache"), d.pop("cache_seqlens"), **d,
                                        return_lse=True, backend="cpu", **kw)
    assert out.placements == (places["q"],), (what, out.placements)
    _same(out, r_out, f"{what}: out")
    _same(lse, r_lse, f"{what}: lse")
    # the full op wrote ref's caches (popped above): compare through a second full run's caches
    ck, cv = full["k_cache"].clone(), full["v_cache"].clone()
    f2 = dict(full, k_cache=ck, v_cache=cv)
    posattn.decode_attention(f2.pop("q"), f2.pop("k_cache"), f2.pop("v_cache"), f2.pop("cache_seqlens"), **f2,
                             backend="cpu", **kw)
    _same(kc, ck, f"{what}: k_cache written")
    _same(vc, cv, f"{what}: v_cache written")


def decode_cases(rank, world):
    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(3)
    B, Tq, HQ, HK, Dh, S = 4, 3, 4, 2, 80, 16
    q = torch.randn(B, Tq, HQ, Dh, generator=g)
    k, v = torch.randn(B, Tq, HK, Dh, generator=g), torch.randn(B, Tq, HK, Dh, generator=g)
    kc, vc = torch.randn(B, S, HK, Dh, generator=g), torch.randn(B, S, HK, Dh, generator=g)
    lens = torch.tensor([5, 0, 9, 12], dtype=torch.int32)
    spec = posattn.RopeSpec(Dh)
    full = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, k=k, v=v)
    heads = dict(q=Shard(2), k_cache=Shard(2), v_cache=Shard(2), k=Shard(2), v=Shard(2))
    _decode(mesh, full, heads, "decode heads, contiguous cache, new k/v, rope", rope=spec, window=6)
    batch = dict(q=Shard(0), k_cache=Shard(0), v_cache=Shard(0), cache_seqlens=Shard(0), k=Shard(0), v=Shard(0))
    _decode(mesh, full, batch, "decode batch, contiguous cache, new k/v, rope", rope=spec)
    _decode(mesh, full, {n: R for n in full}, "decode replicated", rope=spec)

    # paged cache, packed ragged q (cu_seqlens_q), per-KV-head key lists: heads only
    page, nblk = 4, 12
    bt = torch.randperm(nblk, generator=g)[:B * 3].view(B, 3).int()
    pk, pv = torch.randn(nblk, page, HK, Dh, generator=g), torch.randn(nblk, page, HK, Dh, generator=g)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    qp = torch.randn(6, HQ, Dh, generator=g)
    idx = torch.sort(torch.randint(0, 2, (B, HK, 4), generator=g), -1).values.int()
    idx[1] = -1                                                    # request 1 has no cached token
    fullp = dict(q=qp, k_cache=pk, v_cache=pv, cache_seqlens=torch.tensor([5, 0, 6, 3], dtype=torch.int32), block_table=bt, cu_seqlens_q=cu, kv_indices=idx)
    _decode(mesh, fullp, dict(q=Shard(1), k_cache=Shard(2), v_cache=Shard(2), kv_indices=Shard(1)),
            "decode heads, paged cache, packed q, kv_indices", causal=True)

    def call(**places):
        d = {n: (_dist(mesh, x, places[n]) if n in places else x) for n, x in full.items()}
        return lambda: posattn.decode_attention(d.pop("q"), d.pop("k_cache"), d.pop("v_cache"),
                                                d.pop("cache_seqlens"), **d, backend="cpu")
    # GQA: q on heads with the cache replicated would pair rank 1's query heads with KV head 0
    _raises(call(q=Shard(2), k=Shard(2), v=Shard(2)), "posattn.decode_attention",
            "unsupported DTensor placements on mesh dimension 0", "k_cache R", "heads: q S(2), k_cache S(2)")
    _raises(call(q=Shard(3), k_cache=Shard(3), v_cache=Shard(3), k=Shard(3), v=Shard(3)), "q S(3)")
    k1 = dict(full, k_cache=kc[:, :, :1], v_cache=vc[:, :, :1], k=k[:, :, :1], v=v[:, :, :1])
    d1 = {n: _dist(mesh, x, Shard(2)) if n != "cache_seqlens" else x for n, x in k1.items()}
    _raises(lambda: posattn.decode_attention(d1.pop("q"), d1.pop("k_cache"), d1.pop("v_cache"), lens, k=d1["k"],
                                             v=d1["v"], backend="cpu"), "head count divisible by 2", "k_cache 1")
    dp = {n: _dist(mesh, x, Shard(0)) for n, x in fullp.items() if n in ("q", "cache_seqlens", "block_table")}
    _raises(lambda: posattn.decode_attention(dp["q"], pk, pv, dp["cache_seqlens"], block_table=dp["block_table"],
                                             cu_seqlens_q=cu, backend="cpu"),
            "q S(0)", "block_table S(0)", "page pool shared by the batch")
    _raises(call(q=Shard(0), k_cache=Shard(0), v_cache=Shard(0), k=Shard(0), v=Shard(0)), "cache_seqlens R")
    # an uneven batch shard is refused (3 requests on 2 ranks), naming the tensor
    f3 = {n: (x[:3] if n != "cache_seqlens" else x[:3]) for n, x in full.items()}
    d3 = {n: _dist(mesh, x, Shard(0)) for n, x in f3.items()}
    _raises(lambda: posattn.decode_attention(d3.pop("q"), d3.pop("k_cache"), d3.pop("v_cache"),
                                             d3.pop("cache_seqlens"), **d3, backend="cpu"), "dim 0 has 3 entries")


def cache_cases(rank, world):
    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(4)
    T, HQ, HK, Dh, page, nblk = 7, 6, 2, 96, 4, 5
    spec = posattn.RopeSpec(Dh, rotary_dim=64)
    q, k, v = torch.randn(T, HQ, Dh, generator=g), torch.randn(T, HK, Dh, generator=g), torch.randn(T, HK, Dh,
                                                                                                     generator=g)
    pos = torch.randint(0, 5000, (T,), generator=g)
    slots = torch.randperm(nblk * page, generator=g)[:T].to(torch.int64)
    slots[3] = -1                                                 # a padding token
    for layout, ch in (("NHD", 2), ("HND", 1)):
        shape = (nblk, page, HK, Dh) if layout == "NHD" else (nblk, HK, page, Dh)
        kc, vc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        rk, rv = kc.clone(), vc.clone()
        r_q = posattn.rope_and_cache(q, k, v, pos, spec, rk, rv, slots, kv_layout=layout, backend="cpu")
        dq, dk, dv = (distribute_tensor(x, mesh, [Shard(1)]) for x in (q, k, v))
        dkc, dvc = (distribute_tensor(x.clone(), mesh, [Shard(ch)]) for x in (kc, vc))
        out = posattn.rope_and_cache(dq, dk, dv, pos, spec, dkc, dvc, slots, kv_layout=layout, backend="cpu")
        assert out.placements == (Shard(1),)
        _same(out, r_q, f"rope_and_cache heads {layout}: q")
        _same(dkc, rk, f"rope_and_cache heads {layout}: k_cache")
        _same(dvc, rv, f"rope_and_cache heads {layout}: v_cache")
    kc = torch.randn(nblk, page, HK, Dh, generator=g)
    dq, dk, dv = (distribute_tensor(x, mesh, [Shard(0)]) for x in (q[:6], k[:6], v[:6]))
    _raises(lambda: posattn.rope_and_cache(dq, dk, dv, pos[:6], spec, kc, kc.clone(), slots[:6], backend="cpu"),
            "posattn.rope_and_cache", "q S(0)", "slot_mapping holds global slots")

    # kv_compact: paged on heads, contiguous on batch
    B, N = 4, 3
    lens = torch.tensor([1, 0, 4, 2], dtype=torch.int32)
    src = torch.tensor([[2, 3, 5], [0, 2, 3], [4, 6, 7], [3, 4, 6]], dtype=torch.int64)
    counts = torch.tensor([2, 3, 0, 1], dtype=torch.int32)
    bt = torch.randperm(12, generator=g)[:B * 3].view(B, 3).int()
    for what, kc, bt_, p_cache, p_meta in (("heads, paged", torch.randn(12, 4, HK, Dh, generator=g), bt, Shard(2), R),
                                           ("batch, contiguous", torch.randn(B, 12, HK, Dh, generator=g), None,
                                            Shard(0), Shard(0))):
        vc = torch.randn(kc.shape, generator=g)
        rk, rv, rl = kc.clone(), vc.clone(), lens.clone()
        posattn.kv_compact(rk, rv, rl, src, counts, block_table=bt_, backend="cpu")
        dkc, dvc = (distribute_tensor(x.clone(), mesh, [p_cache]) for x in (kc, vc))
        dl, ds, dc = (distribute_tensor(x.clone(), mesh, [p_meta]) for x in (lens, src, counts))
        posattn.kv_compact(dkc, dvc, dl, ds, dc, block_table=bt_, backend="cpu")
        for a, b, n in ((dkc, rk, "k_cache"), (dvc, rv, "v_cache"), (dl, rl, "cache_seqlens")):
            _same(a, b, f"kv_compact {what}: {n}")
    dkc = distribute_tensor(torch.randn(12, 4, HK, Dh), mesh, [Shard(0)])
    _raises(lambda: posattn.kv_compact(dkc, dkc.clone(), lens.clone(), src, counts, block_table=bt, backend="cpu"),
            "posattn.kv_compact", "k_cache S(0)", "page pool")


def lowered_cases(rank, world):
    """The lowered torch op (what torch.compile and direct calls reach) has a sharding rule:
    heads run locally (a replicated cache is sliced to the rank's KV heads), anything else is refused."""
    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(5)
    HQ, HK, Dh, page, nblk = 4, 2, 80, 4, 12
    q = torch.randn(6, HQ, Dh, generator=g)
    kc, vc = torch.randn(nblk, page, HK, Dh, generator=g), torch.randn(nblk, page, HK, Dh, generator=g)
    bt = torch.randperm(nblk, generator=g)[:12].view(4, 3).int()
    lens = torch.tensor([5, 0, 6, 3], dtype=torch.int32)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    op = torch.ops.posattn.decode_attention
    tail = (True, -1, Dh ** -0.5, 0, 3, "cpu", None)
    r_out, r_lse = op(q, kc, vc, bt, lens, cu, None, *tail)
    rep = lambda x: distribute_tensor(x, mesh, [R])  # noqa: E731
    for cache_p, what in ((Shard(2), "heads"), (R, "heads of q, replicated cache")):
        out, lse = op(distribute_tensor(q, mesh, [Shard(1)]), distribute_tensor(kc, mesh, [cache_p]),
                      distribute_tensor(vc, mesh, [cache_p]), rep(bt), rep(lens), rep(cu), None, *tail)
        assert out.placements == (Shard(1),) and lse.placements == (Shard(1),), what
        _same(out, r_out, f"lowered decode {what}: out")
        _same(lse, r_lse, f"lowered decode {what}: lse")
    _raises(lambda: op(distribute_tensor(q, mesh, [Shard(0)]), rep(kc), rep(vc), rep(bt), rep(lens), rep(cu), None,
                       *tail), "posattn::decode_attention", "q S(0)", "batch placements run through the public")
    q6, k3 = distribute_tensor(torch.randn(6, 6, Dh), mesh, [Shard(1)]), torch.randn(nblk, page, 3, Dh)
    _raises(lambda: op(q6, distribute_tensor(k3, mesh, [Shard(2)]), distribute_tensor(k3, mesh, [Shard(2)]),
                       rep(bt), rep(lens), rep(cu), None, *tail), "head counts divisible by 2")


def lowered_cache_cases(rank, world):
    """The lowered posattn::rope_and_cache op: head-sharded q/k/v and caches write the caches'
    local shards and equal the full op; a replicated cache beside head-sharded q is refused (its
    slice would be a copy and the write lost)."""
    from posattn.rope.spec import RopeSpec

    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(6)
    T, HQ, HK, Dh, page, nblk = 5, 4, 2, 64, 4, 3
    q, k, v = torch.randn(T, HQ, Dh, generator=g), torch.randn(T, HK, Dh, generator=g), torch.randn(T, HK, Dh,
                                                                                                     generator=g)
    kc, vc = torch.randn(nblk, page, HK, Dh, generator=g), torch.randn(nblk, page, HK, Dh, generator=g)
    slots = torch.tensor([3, 0, 7, -1, 10], dtype=torch.int64)
    pos3 = torch.randint(0, 900, (1, 1, T), generator=g)
    inv = RopeSpec(Dh).inv_freq().float()
    op = torch.ops.posattn.rope_and_cache
    tail = (1.0, Dh, False, True, False, "cpu")
    rk, rv = kc.clone(), vc.clone()
    r_q = op(q, k, v, rk, rv, slots, pos3, inv, None, None, None, *tail)
    rep = lambda x: distribute_tensor(x, mesh, [R])  # noqa: E731
    hd = lambda x: distribute_tensor(x, mesh, [Shard(1)])  # noqa: E731
    dkc, dvc = (distribute_tensor(x.clone(), mesh, [Shard(2)]) for x in (kc, vc))
    out = op(hd(q), hd(k), hd(v), dkc, dvc, rep(slots), rep(pos3), rep(inv), None, None, None, *tail)
    assert out.placements == (Shard(1),)
    _same(out, r_q, "lowered rope_and_cache heads: q")
    _same(dkc, rk, "lowered rope_and_cache heads: k_cache written")
    _same(dvc, rv, "lowered rope_and_cache heads: v_cache written")
    _raises(lambda: op(hd(q), hd(k), hd(v), rep(kc), rep(vc), rep(slots), rep(pos3), rep(inv), None, None, None,
                       *tail), "posattn::rope_and_cache", "k_cache is written in place", "S(2)")


def lowered_compact_cases(rank, world):
    """The lowered posattn::kv_compact op: paged caches on heads, contiguous ones on batch, equal the
    full op (caches and lengths, all written in place); a replicated cache_seqlens beside a batch
    shard is refused."""
    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(7)
    B, HK, Dh = 4, 2, 32
    lens = torch.tensor([1, 0, 4, 2], dtype=torch.int32)
    src = torch.tensor([[2, 3, 5], [0, 2, 3], [4, 6, 7], [3, 4, 6]], dtype=torch.int64)
    counts = torch.tensor([2, 3, 0, 1], dtype=torch.int32)
    bt = torch.randperm(12, generator=g)[:B * 3].view(B, 3).int()
    op = torch.ops.posattn.kv_compact
    rep = lambda x: distribute_tensor(x, mesh, [R])  # noqa: E731
    for what, kc, bt_, pc, pm in (("heads, paged", torch.randn(12, 4, HK, Dh, generator=g), bt, Shard(2), R),
                                  ("batch, contiguous", torch.randn(B, 12, HK, Dh, generator=g), None, Shard(0),
                                   Shard(0))):
        vc = torch.randn(kc.shape, generator=g)
        rk, rv, rl = kc.clone(), vc.clone(), lens.clone()
        op(rk, rv, rl, src, counts, bt_, False, "cpu")
        dkc, dvc = (distribute_tensor(x.clone(), mesh, [pc]) for x in (kc, vc))
        dl, ds, dc = (distribute_tensor(x.clone(), mesh, [pm]) for x in (lens, src, counts))
        op(dkc, dvc, dl, ds, dc, None if bt_ is None else rep(bt_), False, "cpu")
        for a, b, n in ((dkc, rk, "k_cache"), (dvc, rv, "v_cache"), (dl, rl, "cache_seqlens")):
            _same(a, b, f"lowered kv_compact {what}: {n}")
    kc = torch.randn(B, 12, HK, Dh, generator=g)
    dkc, dvc, ds, dc = (distribute_tensor(x, mesh, [Shard(0)]) for x in (kc, kc.clone(), src, counts))
    _raises(lambda: op(dkc, dvc, rep(lens.clone()), ds, dc, None, False, "cpu"), "posattn::kv_compact",
            "cache_seqlens R", "written in place")


def all_decode_cases(rank, world):
    decode_cases(rank, world)
    cache_cases(rank, world)
    lowered_cases(rank, world)
    lowered_cache_cases(rank, world)
    lowered_compact_cases(rank, world)

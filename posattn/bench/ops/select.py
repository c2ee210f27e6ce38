"""Benchmark cases for token selection: ``select`` (posattn.select.topk over fp32 score rows) and
``sparse_decode`` (one decode step of the selection pipeline: scores summed per KV group, top-k of
``budget`` tokens per KV head, decode_attention over the chosen tokens via kv_indices), against
dense decode_attention on the same paged cache (page 16; Hq 32, Hk 8, D 128).

Peers: torch.topk (and FlashInfer's top_k where it imports) for ``select``; posattn's own dense
decode_attention on the same backend for ``sparse_decode`` (the issue's "<= 25 % / 35 % of dense").
``sparse_decode`` records no accuracy: the pipeline is an approximation of dense attention by design.
"""
from __future__ import annotations

import torch

from posattn.bench.ops._common import dtypes_from, importable, parse_dims, posattn_available
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op, skip_op

HQ, HK, D, PAGE = 32, 8, 128, 16
_REF_MAX = 1 << 22

_TOPK_SWEEPS = {
    ("quick", "cpu"): [(64, 32768, 2048)],
    ("full", "cpu"): [(64, 32768, 2048), (256, 131072, 2048)],
    ("quick", "cuda"): [(256, 131072, 2048)],
    ("full", "cuda"): [(256, 131072, 2048), (64, 131072, 256), (256, 32768, 2048), (1024, 8192, 8192)],
}
# (B, ctx, budget, quest): quest 0 scores every token (scores + topk); 1 scores Quest's pages (page_scores
# summed per KV group + topk of budget / 16 pages + expand_pages; the summary is kept by update_page_summary
# in a serving loop, so it is built outside the timed region); reuse 1: the token pipeline behind TokenSelect's
# SelectionCache when every request's query repeats (SelectionCache.plan gives them length 0: no scoring, no top-k)
_SPARSE_SWEEPS = {
    ("quick", "cpu"): [(1, 32768, 2048, 0), (1, 32768, 2048, 1), (1, 32768, 2048, 0, 1)],
    ("full", "cpu"): [(1, 32768, 2048, 0), (1, 32768, 2048, 1), (1, 32768, 2048, 0, 1), (4, 32768, 2048, 0),
                      (4, 32768, 2048, 1)],
    ("quick", "cuda"): [(8, 131072, 2048, 0), (8, 131072, 2048, 1), (8, 131072, 2048, 0, 1)],
    ("full", "cuda"): [(8, 131072, 2048, 0), (8, 131072, 2048, 1), (8, 131072, 2048, 0, 1), (8, 32768, 2048, 0),
                       (32, 32768, 1024, 0)],
}


def _topk_shape(R, N, k) -> Shape:
    return Shape({"R": R, "N": N, "k": k}, size=R * N)


def _sparse_shape(B, ctx, budget, quest=0, reuse=0, Hq=HQ, Hk=HK, D_=D, page=PAGE) -> Shape:
    dims = {"B": B, "ctx": ctx, "budget": budget, "quest": quest, "Hq": Hq, "Hk": Hk, "D": D_, "page": page}
    if reuse:
        dims["reuse"] = 1
    return Shape(dims, size=B * ctx)


def topk_inputs(shape: Shape, dtype, device) -> dict:
    d = shape.dims
    g = torch.Generator().manual_seed(0)
    s = torch.randn(d["R"], d["N"], generator=g).to(device)
    return {"scores": s, "k": d["k"]}


def topk_reference(inp):
    from posattn.kernels.reference import select as ref

    s = inp["scores"]
    if s.numel() > _REF_MAX:
        return None
    L = torch.full((s.shape[0],), s.shape[1], dtype=torch.int32, device=s.device)
    return (ref.topk(s, L, inp["k"], 0, 0).to(torch.float64),)


def _ascending(o):
    return (torch.sort(o.to(torch.int64), dim=-1).values.to(torch.float64),)


def sparse_inputs(shape: Shape, dtype, device) -> dict:
    d = shape.dims
    B, ctx, ps = d["B"], d["ctx"], d["page"]
    per = -(-ctx // ps)
    g = torch.Generator().manual_seed(0)
    pool = B * per
    kc = torch.randn(pool, ps, d["Hk"], d["D"], generator=g).to(dtype).to(device)
    vc = torch.randn(pool, ps, d["Hk"], d["D"], generator=g).to(dtype).to(device)
    bt = torch.randperm(pool, generator=g).to(torch.int32).reshape(B, per).to(device)
    cs = torch.full((B,), ctx - 1, dtype=torch.int32, device=device)   # + the step's token, already cached
    q = torch.randn(B, d["Hq"], d["D"], generator=g).to(dtype).to(device)
    inp = {"q": q, "k_cache": kc, "v_cache": vc, "block_table": bt, "cache_seqlens": cs, "budget": d["budget"],
           "summary": None, "cache": None}
    if d.get("reuse"):
        import posattn

        inp["cache"] = posattn.select.SelectionCache(0.9)    # primed by the first (untimed) step
    if d.get("quest"):
        import posattn

        inp["summary"] = posattn.select.page_summary(kc, cs + 1, block_table=bt)
    return inp


def sparse_step(inp, backend=None):
    """One decode step of the pipeline: [B, 1, Hq, D] attention over each KV head's top tokens among
    the ``ctx - 1`` cached ones, plus the step's own token (at slot ctx - 1, as after rope_and_cache)."""
    import posattn

    q, kc, vc, cs, bt = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"], inp["block_table"]
    if inp["summary"] is None:
        cache = inp["cache"]
        L = cs if cache is None else cache.plan(q, cs)       # 0 for the requests that reuse
        s = posattn.select.scores(q, kc, L, block_table=bt, reduce="kv_group", backend=backend)
        idx = posattn.select.topk(s, inp["budget"], lengths=L, backend=backend)
        if cache is not None:
            idx = cache.choose(q, idx, cs)
    else:
        sm = inp["summary"]
        ps = sm.page_size
        ub = posattn.select.page_scores(q, sm.kmin, sm.kmax, cs, page_size=ps, block_table=bt, backend=backend)
        B, HQ_, P = ub.shape
        ub = ub.view(B, sm.kmin.shape[1], HQ_ // sm.kmin.shape[1], P).sum(2)        # per KV group
        pages = posattn.select.topk(ub, max(1, inp["budget"] // ps), lengths=(cs + ps - 1) // ps, backend=backend)
        idx = posattn.select.expand_pages(pages, ps, cs)
    return posattn.decode_attention(q[:, None], kc, vc, cs, block_table=bt, kv_indices=idx, backend=backend)


def dense_step(inp, backend=None):
    import posattn

    return posattn.decode_attention(inp["q"][:, None], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                    block_table=inp["block_table"], backend=backend)


def _register():
    topk = register_op(BenchOp(
        name="select", title="posattn.select.topk: k of each fp32 row (radix select)", make_inputs=topk_inputs,
        reference=topk_reference, sweep=lambda m, dt: [_topk_shape(*x) for x in _TOPK_SWEEPS[(m, dt)]],
        dtypes=dtypes_from({(m, dt): ("float32",) for m in ("quick", "full") for dt in ("cpu", "cuda")}),
        bytes=lambda sh, dt: sh.dims["R"] * (sh.dims["N"] * 4 + sh.dims["k"] * 4), flops=lambda sh, dt: 0,
        parse_shape=lambda t: _topk_shape(**{"R": 256, "N": 131072, "k": 2048,
                                             **parse_dims(t, "select", ("R", "N", "k"), "R=256,N=131072,k=2048")}),
        size_name="scores", baseline=("torch", "flashinfer")))

    def _topk_factory(backend):
        def factory(inp, device_type):
            import posattn

            s, k = inp["scores"], inp["k"]
            if backend == "reference" and s.numel() > _REF_MAX:
                raise Unsupported("the reference is timed on small inputs only")
            return (lambda: posattn.select.topk(s, k, backend=backend)), _ascending
        return factory

    for b in ("triton", "cpu", "reference"):
        topk.backend(b, available=posattn_available("topk", b),
                     note=f"posattn.select.topk(scores, k, backend={b!r}); indices in ascending order")(_topk_factory(b))

    @topk.peer("torch", note="torch.topk(scores, k, dim=-1) (sorted by value)")
    def _torch(inp, device_type):
        s, k = inp["scores"], inp["k"]
        return (lambda: torch.topk(s, k, dim=-1).indices), _ascending

    @topk.peer("flashinfer", available=importable("flashinfer", cuda_only=True),
               note="flashinfer.top_k(scores, k) where this FlashInfer has it")
    def _fi(inp, device_type):
        import flashinfer

        fn = getattr(flashinfer, "top_k", None)
        if fn is None:
            raise Unsupported("this FlashInfer has no top_k")
        s, k = inp["scores"], inp["k"]

        def canon(o):
            idx = o[1] if isinstance(o, (tuple, list)) else o
            return _ascending(idx)
        return (lambda: fn(s, k)), canon

    sp = register_op(BenchOp(
        name="sparse_decode", title="sparse decode step: scores (kv_group) + topk(budget) + decode_attention("
        "kv_indices), paged page 16, Hq 32, Hk 8, D 128, vs dense decode_attention", make_inputs=sparse_inputs,
        reference=lambda inp: None,
        sweep=lambda m, dt: [_sparse_shape(*x) for x in _SPARSE_SWEEPS[(m, dt)]],
        dtypes=dtypes_from({(m, dt): ("bfloat16",) for m in ("quick", "full") for dt in ("cpu", "cuda")}),
        bytes=lambda sh, dt: _sparse_bytes(sh, dt), flops=lambda sh, dt: 0,
        parse_shape=lambda t: _sparse_shape(**{"B": 8, "ctx": 131072, "budget": 2048, **parse_dims(
            t, "sparse_decode", ("B", "ctx", "budget", "quest", "reuse", "Hq", "Hk", "D", "page"),
            "B=8,ctx=131072,budget=2048,quest=1")}),
        size_name="cached tokens", baseline=("dense",)))

    def _sparse_factory(backend):
        def factory(inp, device_type):
            sparse_step(inp, backend)                   # the checked calls: plans are kept
            return (lambda: sparse_step(inp, backend)), (lambda o: (o,))
        return factory

    for b in ("triton", "cpu"):
        sp.backend(b, available=posattn_available("scores", b),
                   note=f"scores + topk + decode_attention(kv_indices=...), backend={b!r}")(_sparse_factory(b))

    @sp.peer("dense", note="posattn.decode_attention over the whole cache (the default backend for the device)")
    def _dense(inp, device_type):
        dense_step(inp)
        return (lambda: dense_step(inp)), (lambda o: (o,))

    return topk, sp


def _sparse_bytes(sh, dt):
    d = sh.dims
    e = torch.empty((), dtype=dt).element_size()
    # keys once for the scores, then budget keys and values per KV head
    return d["B"] * d["Hk"] * d["D"] * e * (d["ctx"] + 2 * d["budget"])


import posattn  # noqa: E402

if getattr(posattn, "select", None) is None:
    skip_op("select", "posattn has no select")
    skip_op("sparse_decode", "posattn has no select")
else:
    _register()

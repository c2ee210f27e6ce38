"""Benchmark case ``a2ats``: one decode step of the A2ATS pipeline (posattn.select.A2ATS's per-step
work) against dense decode_attention on the same paged cache (page 16; Hq 32, Hk 8, D 128, bf16).

Timed: the far query (q rotated back from its position and on to the window, vq.far_queries), the
windowed scores summed per KV group (far tokens from int16 codes by centroid lookup, the last
``window`` exactly from the cache), top-k of ``budget`` tokens per KV head (A2ATS's default),
decode_attention over them (kv_indices).
Not timed: the codebook and the codes (a serving loop assigns each token's code once, as it is
cached). The codebook here is random keys (M = I): the timing does not depend on the fit.
Records no accuracy (an approximation by design; benchmarks/vq_recall.py measures its quality).
"""
from __future__ import annotations

import torch

from posattn.bench.ops._common import dtypes_from, parse_dims, posattn_available
from posattn.bench.registry import BenchOp, Shape, register_op, skip_op

HQ, HK, D, PAGE = 32, 8, 128, 16
# (B, ctx, budget, n_codes, window)
_SWEEPS = {
    ("quick", "cpu"): [(1, 32768, 2048, 1024, 128)],
    ("full", "cpu"): [(1, 32768, 2048, 1024, 128), (4, 32768, 2048, 1024, 128)],
    ("quick", "cuda"): [(8, 131072, 2048, 1024, 128)],
    ("full", "cuda"): [(8, 131072, 2048, 1024, 128), (8, 32768, 2048, 1024, 128), (32, 32768, 1024, 256, 64)],
}


def _shape(B, ctx, budget, codes=1024, window=128, Hq=HQ, Hk=HK, D_=D, page=PAGE) -> Shape:
    return Shape({"B": B, "ctx": ctx, "budget": budget, "codes": codes, "window": window, "Hq": Hq, "Hk": Hk,
                  "D": D_, "page": page}, size=B * ctx)


def make_inputs(shape: Shape, dtype, device) -> dict:
    import posattn
    from posattn.vq import Codebook

    d = shape.dims
    B, ctx, ps, hk, dd, C = d["B"], d["ctx"], d["page"], d["Hk"], d["D"], d["codes"]
    per = -(-ctx // ps)
    g = torch.Generator().manual_seed(0)
    pool = B * per
    kc = torch.randn(pool, ps, hk, dd, generator=g).to(dtype).to(device)
    vc = torch.randn(pool, ps, hk, dd, generator=g).to(dtype).to(device)
    codes = torch.randint(0, C, (pool, ps, hk), generator=g).to(torch.int16).to(device)
    bt = torch.randperm(pool, generator=g).to(torch.int32).reshape(B, per).to(device)
    cs = torch.full((B,), ctx - 1, dtype=torch.int32, device=device)    # + the step's token, already cached
    q = torch.randn(B, d["Hq"], dd, generator=g).to(dtype).to(device)
    cent = torch.randn(hk, C, dd, generator=g).to(device)
    cb = Codebook(cent, cent.clone(), (cent * cent).sum(-1), False)
    return {"q": q, "k_cache": kc, "v_cache": vc, "codes": codes, "block_table": bt, "cache_seqlens": cs,
            "codebook": cb, "budget": d["budget"], "window": d["window"], "rope": posattn.RopeSpec(head_dim=dd)}


def a2ats_step(inp, backend=None):
    """[B, 1, Hq, D]: the step's attention over each query head's chosen tokens (post-RoPE cache)."""
    import posattn
    from posattn.vq.ops import far_queries, windowed

    q, kc, vc, cs, bt = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"], inp["block_table"]
    D_ = q.shape[-1]
    qf = far_queries(q, inp["rope"], inp["window"], inverse_positions=cs, backend=backend)
    s = windowed(q, qf, inp["codebook"], inp["codes"], kc, bt, cs, inp["window"], D_ ** -0.5, None, backend,
                 "kv_group")
    idx = posattn.select.topk(s, inp["budget"], lengths=cs, backend=backend)
    return posattn.decode_attention(q[:, None], kc, vc, cs, block_table=bt, kv_indices=idx, backend=backend)


def dense_step(inp, backend=None):
    import posattn

    return posattn.decode_attention(inp["q"][:, None], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                    block_table=inp["block_table"], backend=backend)


def _bytes(sh, dt):
    d = sh.dims
    e = torch.empty((), dtype=dt).element_size()
    # int16 codes of every token, the window's keys, then budget keys and values per KV head
    return d["B"] * (d["ctx"] * d["Hk"] * 2 + d["Hk"] * d["D"] * e * d["window"]
                     + 2 * d["Hk"] * d["D"] * e * d["budget"])


def _register():
    op = register_op(BenchOp(
        name="a2ats", title="A2ATS decode step: far queries + VQ windowed scores + topk(budget) + "
        "decode_attention(kv_indices), paged page 16, Hq 32, Hk 8, D 128, vs dense decode_attention",
        make_inputs=make_inputs, reference=lambda inp: None,
        sweep=lambda m, dt: [_shape(*x) for x in _SWEEPS[(m, dt)]],
        dtypes=dtypes_from({(m, dt): ("bfloat16",) for m in ("quick", "full") for dt in ("cpu", "cuda")}),
        bytes=_bytes, flops=lambda sh, dt: 0,
        parse_shape=lambda t: _shape(**{"B": 8, "ctx": 131072, "budget": 2048, **parse_dims(
            t, "a2ats", ("B", "ctx", "budget", "codes", "window", "Hq", "Hk", "D", "page"),
            "B=8,ctx=131072,budget=2048,codes=1024,window=128")}),
        size_name="cached tokens", baseline=("dense",)))

    def _factory(backend):
        def factory(inp, device_type):
            a2ats_step(inp, backend)                   # the checked calls: plans are kept
            return (lambda: a2ats_step(inp, backend)), (lambda o: (o,))
        return factory

    for b in ("triton", "cpu"):
        op.backend(b, available=posattn_available("vq_code_scores", b),
                   note=f"vq windowed scores + topk + decode_attention(kv_indices=...), backend={b!r}")(_factory(b))

    @op.peer("dense", note="posattn.decode_attention over the whole cache (the default backend for the device)")
    def _dense(inp, device_type):
        dense_step(inp)
        return (lambda: dense_step(inp)), (lambda o: (o,))

    return op


import posattn  # noqa: E402

if getattr(posattn, "vq", None) is None:
    skip_op("a2ats", "posattn has no vq")
else:
    _register()

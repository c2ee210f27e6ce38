"""Benchmark cases for the decode engine: ``decode_attention`` (one new token per request over a
paged cache), ``tree_attention`` (a batch of draft trees verified over a cached prefix) and
``decode_rotary`` (the in-kernel rotation of issues 14/15 against decode over a rotated cache).

Both time the public op as a user calls it on a repeated signature (its plan: no checks, no
host sync). The cache is paged (page size 16) with the pages of every request shuffled over
the pool; Hq 32, Hk 8, D 128. Peers where they import: FlashInfer's paged decode / prefill
with a packed custom mask, FlexAttention, and torch SDPA over the cache gathered into a
contiguous tensor (the gather is inside the timed region: a user of SDPA has to do it).
"""
from __future__ import annotations

import random

import torch

from posattn.bench.ops._common import (compiled_flex, dtypes_from, flex_available, importable, parse_dims,
                                      posattn_available)
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op, skip_op

HQ, HK, D, PAGE = 32, 8, 128, 16
_REF_MAX = 1 << 27            # B * (ctx + nodes) * Hq * D above which no fp64 reference is computed
_REF_TIMED_MAX = 1 << 22      # ... above which the reference backend is not timed

_DECODE_SWEEPS = {
    ("quick", "cpu"): [(4, 4096)],
    ("full", "cpu"): [(1, 4096), (4, 4096), (4, 16384)],
    ("quick", "cuda"): [(1, 32768), (16, 16384), (64, 4096)],
    ("full", "cuda"): [(b, c) for b in (1, 8, 32, 64) for c in (1024, 8192, 32768, 131072) if b * c <= 1 << 21],
}
_TREE_SWEEPS = {
    ("quick", "cpu"): [(2, 1024, 16)],
    ("full", "cpu"): [(2, 1024, 16), (8, 4096, 64)],
    ("quick", "cuda"): [(8, 8192, 64)],
    ("full", "cuda"): [(8, 8192, 64), (8, 32768, 64), (32, 8192, 64)],
}
_DTYPES = {
    ("quick", "cpu"): ("bfloat16",),
    ("full", "cpu"): ("bfloat16", "float32"),
    ("quick", "cuda"): ("bfloat16",),
    ("full", "cuda"): ("bfloat16", "float16"),
}
dtypes = dtypes_from(_DTYPES)


def _shape(B, ctx, nodes=1, Hq=HQ, Hk=HK, D_=D, page=PAGE) -> Shape:
    dims = {"B": B, "ctx": ctx, "Hq": Hq, "Hk": Hk, "D": D_, "page": page}
    if nodes != 1:
        dims["nodes"] = nodes
    return Shape(dims, size=B * ctx)


def decode_sweep(mode, device_type):
    return [_shape(b, c) for b, c in _DECODE_SWEEPS[(mode, device_type)]]


def tree_sweep(mode, device_type):
    return [_shape(b, c, n) for b, c, n in _TREE_SWEEPS[(mode, device_type)]]


def _parse(op, names, example, default_nodes):
    def parse(text: str) -> Shape:
        d = parse_dims(text, op, names, example)
        return _shape(d.get("B", 4), d.get("ctx", 4096), d.get("nodes", default_nodes), d.get("Hq", HQ),
                      d.get("Hk", HK), d.get("D", D), d.get("page", PAGE))
    return parse


def _random_tree_rows(n: int, rng: random.Random) -> torch.Tensor:
    """bool [n, n]: node i sees itself and its ancestors (parents drawn at random, earlier nodes)."""
    parents = [-1] + [rng.randrange(max(0, i - 8), i) for i in range(1, n)]
    vis = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        a = i
        while a >= 0:
            vis[i, a] = True
            a = parents[a]
    return vis


def _pack(vis: torch.Tensor) -> torch.Tensor:
    n = vis.shape[1]
    words = -(-n // 32)
    bits = torch.zeros(vis.shape[0], words, dtype=torch.int64)
    for w in range(words):
        seg = vis[:, 32 * w:32 * (w + 1)].to(torch.int64)
        bits[:, w] = (seg << torch.arange(seg.shape[1])).sum(1)
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)


def make_inputs(shape: Shape, dtype, device) -> dict:
    """A paged cache holding ``ctx`` tokens per request (``ctx - 1`` cached plus the new one for
    decode; the prefix of ``ctx`` plus ``nodes`` tree tokens for tree verify)."""
    d = shape.dims
    B, ctx, n = d["B"], d["ctx"], d.get("nodes", 1)
    ps = d["page"]
    cached = ctx - 1 if n == 1 else ctx
    per = -(-(cached + n) // ps)
    g = torch.Generator().manual_seed(0)
    pool = B * per
    kc = torch.randn(pool, ps, d["Hk"], d["D"], generator=g).to(dtype).to(device)
    vc = torch.randn(pool, ps, d["Hk"], d["D"], generator=g).to(dtype).to(device)
    bt = torch.randperm(pool, generator=g).to(torch.int32).reshape(B, per).to(device)
    cs = torch.full((B,), cached, dtype=torch.int32, device=device)
    q = torch.randn(B * n, d["Hq"], d["D"], generator=g).to(dtype).to(device)
    cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)
    inp = {"q": q, "k_cache": kc, "v_cache": vc, "block_table": bt, "cache_seqlens": cs, "cu_seqlens_q": cu,
           "nodes": n, "tree_mask": None, "tree_vis": None}
    if n > 1:
        rng = random.Random(0)
        vis = [_random_tree_rows(n, rng) for _ in range(B)]
        inp["tree_vis"] = torch.stack(vis).to(device)                         # [B, n, n]
        inp["tree_mask"] = torch.cat([_pack(v) for v in vis]).to(device)     # [B * n, W]
    return inp


def _kwargs(inp):
    kw = {"block_table": inp["block_table"], "cu_seqlens_q": inp["cu_seqlens_q"]}
    if inp["tree_mask"] is not None:
        kw["tree_mask"] = inp["tree_mask"]
    return kw


def nbytes(shape: Shape, dtype) -> int:
    d = shape.dims
    e = torch.empty((), dtype=dtype).element_size()
    n = d.get("nodes", 1)
    kv = 2 * d["B"] * (d["ctx"] + (n if n > 1 else 0)) * d["Hk"] * d["D"] * e
    return kv + 2 * d["B"] * n * d["Hq"] * d["D"] * e


def flops(shape: Shape, dtype) -> int:
    d = shape.dims
    n = d.get("nodes", 1)
    return 4 * d["B"] * n * d["Hq"] * d["D"] * (d["ctx"] + (n if n > 1 else 0))


def _ref_size(inp) -> int:
    B = inp["block_table"].shape[0]
    ctx = int(inp["cache_seqlens"][0]) + inp["nodes"]
    return B * ctx * inp["q"].shape[1] * inp["q"].shape[2]


def reference(inp: dict):
    from posattn.kernels.reference import decode as ref

    if _ref_size(inp) > _REF_MAX:
        return None
    out, _ = ref.decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"],
                                  inp["cache_seqlens"], inp["cu_seqlens_q"], inp["tree_mask"], True, -1,
                                  inp["q"].shape[2] ** -0.5)
    return (out,)


def _gathered(inp):
    """[B, Hk, S, D] k and v (S = cached + new slots), gathered from the pages."""
    B, per = inp["block_table"].shape
    kc, vc = inp["k_cache"], inp["v_cache"]
    S = int(inp["cache_seqlens"][0]) + inp["nodes"]
    idx = inp["block_table"].long()

    def gather():
        k = kc[idx].reshape(B, per * kc.shape[1], kc.shape[2], kc.shape[3])[:, :S].transpose(1, 2)
        v = vc[idx].reshape(B, per * vc.shape[1], vc.shape[2], vc.shape[3])[:, :S].transpose(1, 2)
        return k, v
    return gather, S


def _register(name, title, sweep, parse_shape):
    op = register_op(BenchOp(
        name=name, title=title, make_inputs=make_inputs, reference=reference, sweep=sweep, dtypes=dtypes,
        bytes=nbytes, flops=flops, parse_shape=parse_shape, size_name="cached tokens",
        baseline=("flashinfer", "flex", "sdpa")))

    def _factory(backend):
        def factory(inp, device_type):
            if backend == "reference" and _ref_size(inp) > _REF_TIMED_MAX:
                raise Unsupported("the fp64 reference is timed on small inputs only")
            args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"])
            kw = _kwargs(inp)
            posattn.decode_attention(*args, **kw, backend=backend)      # the checked call: the plan is kept
            return lambda: posattn.decode_attention(*args, **kw, backend=backend)
        return factory

    for b in ("triton", "cpu", "reference"):
        op.backend(b, available=posattn_available("decode_attention", b),
                   note=f"posattn.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=..., "
                        f"cu_seqlens_q=...{', tree_mask=...' if name == 'tree_attention' else ''}, backend={b!r}); "
                        f"a planned signature")(_factory(b))

    @op.peer("sdpa", note="gather the pages into [B, Hk, S, D] (timed) + scaled_dot_product_attention "
                          "(enable_gqa; a dense boolean mask for trees)")
    def _sdpa(inp, device_type):
        gather, S = _gathered(inp)
        B = inp["block_table"].shape[0]
        n = inp["nodes"]
        q = inp["q"].reshape(B, n, *inp["q"].shape[1:]).transpose(1, 2)
        mask = None
        if n > 1:
            mask = torch.ones(B, 1, n, S, dtype=torch.bool, device=q.device)
            mask[:, 0, :, S - n:] = inp["tree_vis"]
        fn = torch.nn.functional.scaled_dot_product_attention

        def run():
            k, v = gather()
            return fn(q, k, v, attn_mask=mask, enable_gqa=True)
        return run, (lambda o: (o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1]),))

    @op.peer("flex", available=flex_available, full_only=True,
             note="torch.compile(flex_attention) over the cache gathered to contiguous (gather not timed), "
                  "block mask from the same visibility built outside the timed region")
    def _flex_peer(inp, device_type):
        from torch.nn.attention.flex_attention import create_block_mask

        gather, S = _gathered(inp)
        k, v = (x.contiguous() for x in gather())
        B = inp["block_table"].shape[0]
        n = inp["nodes"]
        q = inp["q"].reshape(B, n, *inp["q"].shape[1:]).transpose(1, 2).contiguous()
        if n > 1:
            vis = inp["tree_vis"]

            def mask_mod(b, h, qi, kv):
                jj = (kv - (S - n)).clamp(min=0)
                return (kv < S - n) | vis[b, qi, jj]
            bm = create_block_mask(mask_mod, B, None, n, S, device=q.device)
        else:
            bm = None
        fn = compiled_flex()
        return (lambda: fn(q, k, v, block_mask=bm, enable_gqa=True)), \
            (lambda o: (o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[-1]),))

    @op.peer("flashinfer", available=importable("flashinfer", cuda_only=True),
             note="FlashInfer BatchDecodeWithPagedKVCacheWrapper / BatchPrefillWithPagedKVCacheWrapper with a "
                  "packed custom mask (plan outside the timed region), NHD layout")
    def _flashinfer(inp, device_type):
        import flashinfer

        B, per = inp["block_table"].shape
        ps = inp["k_cache"].shape[1]
        n = inp["nodes"]
        S = int(inp["cache_seqlens"][0]) + n
        used = -(-S // ps)
        dev = inp["q"].device
        indptr = torch.arange(0, (B + 1) * used, used, dtype=torch.int32, device=dev)
        indices = inp["block_table"][:, :used].reshape(-1).contiguous()
        last = torch.full((B,), S - (used - 1) * ps, dtype=torch.int32, device=dev)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        hq, d = inp["q"].shape[1], inp["q"].shape[2]
        hk = inp["k_cache"].shape[2]
        cache = (inp["k_cache"], inp["v_cache"])
        if n == 1:
            # tensor cores for GQA groups of 4 or more, as FlashInfer recommends (the peer at its best)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=hq // hk >= 4)
            w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=inp["q"].dtype, kv_data_type=inp["q"].dtype)
        else:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            mask = torch.ones(B, n, S, dtype=torch.bool, device=dev)
            mask[:, :, S - n:] = inp["tree_vis"]
            qo = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=dev)
            w.plan(qo, indptr, indices, last, hq, hk, d, ps, custom_mask=mask.reshape(-1),
                   q_data_type=inp["q"].dtype, kv_data_type=inp["q"].dtype)
        q = inp["q"]
        return (lambda: w.run(q, cache)), (lambda o: (o,))

    return op


ROTARY_WINDOW = 512          # ReRoPE's window in the "rerope" case (the ReRoPE paper's setting)
_ROT_SWEEPS = {
    ("quick", "cpu"): [(4, 4096)],
    ("full", "cpu"): [(1, 4096), (4, 16384)],
    ("quick", "cuda"): [(1, 32768), (16, 32768)],
    ("full", "cuda"): [(b, c) for b in (1, 16, 64) for c in (8192, 32768, 131072) if b * c <= 1 << 21],
}


def _register_rotary():
    """decode_rotary: the same decode step four ways, timed in one run (speed-ups against "rotated"):

    rotated   decode_attention(..., rope=spec): q rotated by apply_rope, keys cached after RoPE
    pre-rope  key_positions="slots": the cache holds keys before RoPE, each key tile rotated in the kernel
    rerope    pre-rope + position_map=ReRoPE(512) (two products only on tiles straddling the window)
    bf16x3    pre-rope + qk_precision="bf16x3" (split-bf16 products, issue 15); pre-rope is its bf16 twin
    """
    spec = posattn.RopeSpec(D)
    variants = {
        "rotated": {},
        "pre-rope": {"key_positions": "slots"},
        "rerope": {"key_positions": "slots", "position_map": posattn.ReRoPE(ROTARY_WINDOW)},
        "bf16x3": {"key_positions": "slots", "qk_precision": "bf16x3"},
    }
    op = register_op(BenchOp(
        name="decode_rotary", title="decode over a pre-RoPE cache (rotated per key tile), ReRoPE and bf16x3 vs "
        "decode over a rotated cache: one new token per request, page 16, Hq 32, Hk 8, D 128",
        make_inputs=make_inputs, reference=lambda inp: None,     # four different results: tests/decode checks them
        sweep=lambda mode, dt: [_shape(b, c) for b, c in _ROT_SWEEPS[(mode, dt)]], dtypes=dtypes, bytes=nbytes,
        flops=flops, size_name="cached tokens", baseline=("rotated",),
        parse_shape=_parse("decode_rotary", ("B", "ctx", "Hq", "Hk", "D", "page"), "B=1,ctx=32768", 1)))

    def factory(extra):
        def make(inp, device_type):
            args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"])
            kw = dict(_kwargs(inp), rope=spec, **extra)
            posattn.decode_attention(*args, **kw)                    # the checked call: the plan is kept
            return lambda: posattn.decode_attention(*args, **kw)
        return make

    for name, extra in variants.items():
        args = "".join(f", {k}={v!r}" for k, v in extra.items())
        op.backend(name, note=f"posattn.decode_attention(..., rope=RopeSpec(128){args}); the device's default "
                              "backend, a planned signature")(factory(extra))
    return op


import posattn  # noqa: E402

if getattr(posattn, "decode_attention", None) is None:
    skip_op("decode_attention", "posattn has no decode_attention")
    skip_op("tree_attention", "posattn has no decode_attention")
    skip_op("decode_rotary", "posattn has no decode_attention")
else:
    _register("decode_attention", "decode_attention: one new token per request over a paged cache (page 16), "
              "Hq 32, Hk 8, D 128", decode_sweep,
              _parse("decode_attention", ("B", "ctx", "Hq", "Hk", "D", "page"), "B=8,ctx=32768", 1))
    _register("tree_attention", "tree verify: decode_attention with per-request draft trees (tree_mask) over a "
              "cached prefix, Hq 32, Hk 8, D 128", tree_sweep,
              _parse("tree_attention", ("B", "ctx", "nodes", "Hq", "Hk", "D", "page"), "B=8,ctx=8192,nodes=64", 64))
    _register_rotary()

"""Benchmark cases for anchor_attention (forward, as a user calls it: boundary checks,
block-list lowering and the kernel): packed rows of bf16/fp16 tokens, 32 query / 8 key heads
of 128, each row one anchor token plus 4 documents.

The training-step comparison with FlexAttention (mask construction + forward + backward) and
the launch-config sweep live in benchmarks/bench_anchor_attention.py.
"""
from __future__ import annotations


import torch

from posattn.bench.ops._common import (attention_nbytes, compiled_flex, dtypes_from, flex_available, parse_dims,
                                      posattn_available)
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op, skip_op

HQ, HK, D = 32, 8, 128
DOCS = 4

_SWEEPS = {
    ("quick", "cpu"): [256],
    ("full", "cpu"): [256, 1024, 4096],
    ("quick", "cuda"): [4096, 16384],
    ("full", "cuda"): [4096, 16384, 65536],
}
_DTYPES = {
    ("quick", "cpu"): ("float32",),
    ("full", "cpu"): ("float32", "bfloat16"),
    ("quick", "cuda"): ("bfloat16",),
    ("full", "cuda"): ("bfloat16", "float16"),
}
_DENSE_MAX = 1 << 23          # T * T * Hq above which no dense (reference, SDPA) run is affordable


def _shape(T=1024, row=None, Hq=HQ, Hk=HK, D_=D) -> Shape:
    row = row or min(T, 16384)
    return Shape({"T": T, "row": row, "Hq": Hq, "Hk": Hk, "D": D_}, size=T)


def sweep(mode: str, device_type: str) -> list[Shape]:
    return [_shape(T) for T in _SWEEPS[(mode, device_type)]]


dtypes = dtypes_from(_DTYPES)


def parse_shape(text: str) -> Shape:
    dims = parse_dims(text, "anchor_attention", ("T", "row", "Hq", "Hk", "D"), "T=16384,row=16384,Hq=32,Hk=8,D=128")
    T = dims.get("T", 1024)
    return _shape(T, dims.get("row"), dims.get("Hq", HQ), dims.get("Hk", HK), dims.get("D", D))


def _layout(T: int, row: int):
    """Rows of ``row`` tokens: an anchor token, then DOCS documents of equal length."""
    if T % row:
        raise Unsupported(f"T ({T}) must be a multiple of row ({row})")
    cs, cr = [0], [0]
    for r0 in range(0, T, row):
        cs.append(r0 + 1)
        step = max(1, (row - 1) // DOCS)
        b = r0 + 1
        for _ in range(DOCS - 1):
            b = min(b + step, r0 + row - 1)
            if b > cs[-1]:
                cs.append(b)
        cs.append(r0 + row)
        cr.append(r0 + row)
    return torch.tensor(cs, dtype=torch.int32), torch.tensor(cr, dtype=torch.int32)


def _pairs(cu: torch.Tensor, rows: torch.Tensor) -> int:
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    pairs = int((lens * (lens + 1) // 2).sum())
    starts = set(rows[:-1].tolist())
    return pairs + sum(b - a for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if a not in starts)


nbytes = attention_nbytes


def flops(shape: Shape, dtype) -> int:
    # effective: only unmasked (q, k) pairs, 4 D flops each (q.k and p.v)
    d = shape.dims
    cu, rows = _layout(d["T"], d["row"])
    return 4 * d["D"] * d["Hq"] * _pairs(cu, rows)


def make_inputs(shape: Shape, dtype, device) -> dict:
    d = shape.dims
    cu, rows = _layout(d["T"], d["row"])
    return {"q": torch.randn(d["T"], d["Hq"], d["D"], dtype=dtype, device=device),
            "k": torch.randn(d["T"], d["Hk"], d["D"], dtype=dtype, device=device),
            "v": torch.randn(d["T"], d["Hk"], d["D"], dtype=dtype, device=device),
            "cu_seqlens": cu.to(device), "cu_rows": rows.to(device)}


def _dense_ok(inp: dict) -> bool:
    T, hq = inp["q"].shape[:2]
    return T * T * hq <= _DENSE_MAX


def reference(inp: dict):
    from posattn.kernels.reference import attention as ref

    if not _dense_ok(inp):
        return None
    out, _ = ref.anchor_attention(inp["q"], inp["k"], inp["v"], inp["cu_seqlens"], inp["cu_rows"], 1, True, None)
    return (out,)


import posattn  # noqa: E402

if getattr(posattn, "anchor_attention", None) is None:
    skip_op("anchor_attention", "posattn has no anchor_attention")
else:
    op = register_op(BenchOp(
        name="anchor_attention",
        title="anchor_attention forward: packed rows (anchor + 4 documents), Hq 32, Hk 8, D 128",
        make_inputs=make_inputs, reference=reference, sweep=sweep, dtypes=dtypes, bytes=nbytes, flops=flops,
        parse_shape=parse_shape, size_name="tokens", baseline=("flex", "sdpa", "reference")))

    def _factory(backend: str):
        def factory(inp: dict, device_type: str):
            if backend == "reference" and not _dense_ok(inp):
                raise Unsupported("the fp64 reference is timed on small inputs only")
            args = (inp["q"], inp["k"], inp["v"], inp["cu_seqlens"])
            return lambda: posattn.anchor_attention(*args, cu_rows=inp["cu_rows"], num_anchors=1, backend=backend)
        return factory

    for _b in ("triton", "cpu", "reference"):
        op.backend(_b, available=posattn_available("anchor_attention", _b),
                   note=f"posattn.anchor_attention(q, k, v, cu_seqlens, cu_rows=..., backend={_b!r}); "
                        f"lowering included")(_factory(_b))

    def _mask_tensors(inp):
        cu, rows = inp["cu_seqlens"], inp["cu_rows"]
        T = inp["q"].shape[0]
        dev = inp["q"].device
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev), (cu[1:] - cu[:-1]).long())
        tok = torch.arange(T, device=dev, dtype=torch.int32)
        row_start = rows[torch.searchsorted(rows, tok, right=True) - 1]
        return doc, row_start

    @op.peer("sdpa", note="scaled_dot_product_attention with the dense boolean mask [T, T] (built outside the "
                          "timed region), GQA by repeating k, v")
    def _sdpa(inp, device_type):
        if not _dense_ok(inp):
            raise Unsupported("a dense [T, T] mask is not affordable at this size")
        doc, row_start = _mask_tensors(inp)
        T = inp["q"].shape[0]
        i = torch.arange(T, device=doc.device)
        mask = (i[:, None] >= i[None, :]) & ((doc[:, None] == doc[None, :]) | (i[None, :] == row_start[:, None]))
        g = inp["q"].shape[1] // inp["k"].shape[1]
        q = inp["q"].transpose(0, 1)[None]
        k = inp["k"].repeat_interleave(g, 1).transpose(0, 1)[None]
        v = inp["v"].repeat_interleave(g, 1).transpose(0, 1)[None]
        fn = torch.nn.functional.scaled_dot_product_attention
        return (lambda: fn(q, k, v, attn_mask=mask)), (lambda o: (o[0].transpose(0, 1),))

    @op.peer("flex", available=flex_available, full_only=True,
             note="torch.compile(flex_attention) with the same mask_mod; create_block_mask built outside the "
                  "timed region (the per-step cost is in benchmarks/bench_anchor_attention.py)")
    def _flex_peer(inp, device_type):
        from torch.nn.attention.flex_attention import create_block_mask

        doc, row_start = _mask_tensors(inp)
        T = inp["q"].shape[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((doc[q_idx] == doc[kv_idx]) | (kv_idx == row_start[q_idx]))

        bm = create_block_mask(mask_mod, 1, None, T, T, device=inp["q"].device)
        q, k, v = (x.transpose(0, 1)[None].contiguous() for x in (inp["q"], inp["k"], inp["v"]))
        fn = compiled_flex()
        return (lambda: fn(q, k, v, block_mask=bm, enable_gqa=True)), (lambda o: (o[0].transpose(0, 1),))

    # anchor_attention with SelfExtend's position map (issue 14): its own op and peers
    from posattn.bench.ops import attention_map as _attention_map

    _attention_map.register()

"""Benchmark cases for apply_rope_cos_sin: the RoPE sweep's shapes (q and k of a Llama-3-8B
layer: Hq 32, Hk 8, D 128) rotated from precomputed tables instead of a RopeSpec.

Timed region: one layer's rotation of q and k from tables that already exist (a model or an
inference engine builds them once and shares them across layers):

    cuda / triton / cpu / reference   cos_sin_cache [max_pos, D] fp32 + positions (the vLLM /
                                      FlashInfer / SGLang form), check_bounds=False (hot path)
    *-tables                          per-token cos/sin [S, D/2] fp32 (the flash-attn form)
    posattn-on-the-fly                posattn.apply_rope (angles in the kernel), for comparison
    flashinfer-cache / vllm           the libraries' own cos_sin_cache ops, when importable
"""
from __future__ import annotations

import torch

from posattn.bench.ops import rope as _rope
from posattn.bench.ops._common import as_qk, dtypes_from, flashinfer_fn, importable, posattn_available
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op

MAX_POS = 1 << 17  # a 128k-position cache, as long-context engines hold

_SWEEPS = {
    ("quick", "cpu"): [16, 128],
    ("full", "cpu"): [1, 16, 128, 1024, 4096],
    ("quick", "cuda"): [1, 128, 2048, 16384, 65536],
    ("full", "cuda"): [1, 16, 128, 1024, 4096, 16384, 65536],
}
_DTYPES = {
    ("quick", "cpu"): ("float32",),
    ("full", "cpu"): ("float32", "bfloat16"),
    ("quick", "cuda"): ("bfloat16",),
    ("full", "cuda"): ("bfloat16", "float16", "float32"),
}
_REFERENCE_MAX_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}


def sweep(mode: str, device_type: str) -> list[Shape]:
    return [_rope._shape(S=s) for s in _SWEEPS[(mode, device_type)]]


dtypes = dtypes_from(_DTYPES)


def nbytes(shape: Shape, dtype) -> int:
    # q and k read and written, int64 positions, and one fp32 table row (cos and sin) per token
    return _rope.nbytes(shape, dtype) + shape.dims["B"] * shape.dims["S"] * shape.dims["D"] * 4


def make_inputs(shape: Shape, dtype, device) -> dict:
    import posattn

    d = shape.dims
    g = torch.Generator().manual_seed(d["S"])
    q = torch.randn(d["B"], d["S"], d["Hq"], d["D"], generator=g).to(dtype).to(device)
    k = torch.randn(d["B"], d["S"], d["Hk"], d["D"], generator=g).to(dtype).to(device)
    positions = torch.randint(0, MAX_POS, (d["B"], d["S"]), generator=g).to(device)
    spec = posattn.RopeSpec(d["D"], base=_rope.BASE)
    inv = spec.inv_freq().double()
    ang = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).float().to(device)
    half = d["D"] // 2
    rows = cache[positions]  # [B, S, D]
    return {"q": q, "k": k, "positions": positions, "spec": spec, "cos_sin_cache": cache,
            "cos": rows[..., :half].contiguous(), "sin": rows[..., half:].contiguous()}


def reference(inp: dict):
    from posattn.kernels.reference import rope_cos_sin as ref

    half = inp["q"].shape[-1] // 2
    c = inp["cos_sin_cache"][:, :half][None]
    s = inp["cos_sin_cache"][:, half:][None]
    B, S = inp["q"].shape[:2]
    rows = [ref.gather_rows(t, inp["positions"], B, S) for t in (c, s, c, s)]
    return (ref.rotate_tables(inp["q"], *rows, 2 * half, False), ref.rotate_tables(inp["k"], *rows, 2 * half, False))


op = register_op(BenchOp(
    name="rope_cos_sin",
    title="apply_rope_cos_sin: q and k of one Llama-3-8B layer from a cos_sin_cache / cos-sin tables",
    make_inputs=make_inputs, reference=reference, sweep=sweep, dtypes=dtypes, bytes=nbytes, flops=_rope.flops,
    parse_shape=_rope.parse_shape, size_name="tokens", baseline=("flashinfer-cache", "vllm", "reference")))


def _cache_factory(backend: str):
    def factory(inp: dict, device_type: str):
        import posattn

        if backend == "reference" and _rope._elements_of(inp) > _REFERENCE_MAX_ELEMENTS[device_type]:
            raise Unsupported("the fp64 reference is timed on small inputs only")
        q, k, pos, cache = inp["q"], inp["k"], inp["positions"], inp["cos_sin_cache"]
        return lambda: posattn.apply_rope_cos_sin(q, k, cos_sin_cache=cache, positions=pos, check_bounds=False,
                                                  backend=backend)
    return factory


def _tables_factory(backend: str):
    def factory(inp: dict, device_type: str):
        import posattn

        q, k, cos, sin = inp["q"], inp["k"], inp["cos"], inp["sin"]
        return lambda: posattn.apply_rope_cos_sin(q, k, cos, sin, backend=backend)
    return factory


for _b in ("cuda", "triton", "cpu", "reference"):
    op.backend(_b, available=posattn_available("rope_cos_sin", _b),
               note="posattn.apply_rope_cos_sin(q, k, cos_sin_cache=..., positions=..., check_bounds=False, "
                    "backend=%r)" % _b)(_cache_factory(_b))
for _b in ("cuda", "triton", "cpu"):
    op.backend(_b + "-tables", available=posattn_available("rope_cos_sin", _b),
               note="posattn.apply_rope_cos_sin(q, k, cos, sin, backend=%r), per-token [B, S, D/2] fp32 tables" % _b
               )(_tables_factory(_b))


@op.backend("posattn-on-the-fly", note="posattn.apply_rope(q, k, positions, spec): angles computed in the kernel")
def _on_the_fly(inp, device_type):
    import posattn

    q, k, pos, spec = inp["q"], inp["k"], inp["positions"], inp["spec"]
    return lambda: posattn.apply_rope(q, k, pos, spec)


@op.peer("flashinfer-cache", available=importable("flashinfer", cuda_only=True),
         note="flashinfer.apply_rope_with_cos_sin_cache(positions, q [T, Hq*D], k [T, Hk*D], D, cache, True)")
def _flashinfer(inp, device_type):
    apply_rope_with_cos_sin_cache = flashinfer_fn("apply_rope_with_cos_sin_cache")
    q, k = inp["q"], inp["k"]
    B, S, hq, d = q.shape
    q2, k2 = q.reshape(B * S, hq * d), k.reshape(B * S, k.shape[2] * d)
    pos = inp["positions"].reshape(-1)
    cache = inp["cos_sin_cache"]

    def fn():
        return apply_rope_with_cos_sin_cache(pos, q2, k2, d, cache, True)

    return fn, as_qk(q, k)


@op.peer("vllm", available=importable("vllm", cuda_only=True),
         note="vllm._custom_ops.rotary_embedding(positions, q, k, D, cache, True), in place")
def _vllm(inp, device_type):
    from vllm import _custom_ops as vops

    q, k = inp["q"], inp["k"]
    B, S, hq, d = q.shape
    hk = k.shape[2]
    q2, k2 = q.view(B * S, hq * d), k.view(B * S, hk * d)
    pos = inp["positions"].reshape(-1)
    cache = inp["cos_sin_cache"].to(q.dtype)  # vLLM keeps its cache in the model's dtype

    def fn():
        vops.rotary_embedding(pos, q2, k2, d, cache, True)
        return q, k

    return fn

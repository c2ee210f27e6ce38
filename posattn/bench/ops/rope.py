"""Benchmark cases for apply_rope: q and k of a Llama-3-8B layer (32 query
heads, 8 key/value heads, head_dim 128) over a sweep of token counts.

Timed region: one layer's rotation of q and k, positions in, rotated q and k
out. Peers whose API takes cos/sin get them precomputed (a model computes
them once per forward and shares them across layers), so their timed region
holds the rotation alone; posattn computes its angles inside the kernel.
"""
from __future__ import annotations

import torch

from posattn.bench.ops._common import as_qk, dtypes_from, flashinfer_fn, importable, parse_dims, posattn_available
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op

HQ, HK, D = 32, 8, 128
BASE = 500000.0  # Llama 3's rope_theta

_SWEEPS = {
    ("quick", "cpu"): [16, 128, 1024],
    ("full", "cpu"): [1, 16, 128, 1024, 4096, 16384],
    ("quick", "cuda"): [1, 128, 2048, 16384],
    ("full", "cuda"): [1, 16, 128, 1024, 4096, 16384, 65536],
}
_DTYPES = {
    ("quick", "cpu"): ("float32", "bfloat16"),
    ("full", "cpu"): ("float32", "bfloat16", "float16"),
    ("quick", "cuda"): ("bfloat16", "float16"),
    ("full", "cuda"): ("bfloat16", "float16", "float32"),
}
# the fp64 reference is timed only on small inputs (it is an oracle, not a kernel)
_REFERENCE_MAX_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def _shape(B=1, S=1, Hq=HQ, Hk=HK, D_=D) -> Shape:
    return Shape({"B": B, "S": S, "Hq": Hq, "Hk": Hk, "D": D_}, size=B * S)


def sweep(mode: str, device_type: str) -> list[Shape]:
    return [_shape(S=s) for s in _SWEEPS[(mode, device_type)]]


dtypes = dtypes_from(_DTYPES)


def parse_shape(text: str) -> Shape:
    dims = parse_dims(text, "rope", ("B", "S", "Hq", "Hk", "D"), "B=1,S=4096,Hq=32,Hk=8,D=128")
    return _shape(dims.get("B", 1), dims.get("S", 1), dims.get("Hq", HQ), dims.get("Hk", HK), dims.get("D", D))


def _elements(shape: Shape) -> int:
    d = shape.dims
    return d["B"] * d["S"] * (d["Hq"] + d["Hk"]) * d["D"]


def nbytes(shape: Shape, dtype) -> int:
    # q and k read once and written once, plus int64 positions
    esize = torch.empty((), dtype=dtype).element_size()
    return 2 * _elements(shape) * esize + shape.dims["S"] * 8


def flops(shape: Shape, dtype) -> int:
    # per rotated pair: 4 multiplies + 2 adds = 3 per element (sin/cos not counted)
    return 3 * _elements(shape)


def make_inputs(shape: Shape, dtype, device) -> dict:
    import posattn

    d = shape.dims
    q = torch.randn(d["B"], d["S"], d["Hq"], d["D"], dtype=dtype, device=device)
    k = torch.randn(d["B"], d["S"], d["Hk"], d["D"], dtype=dtype, device=device)
    positions = torch.arange(d["S"], device=device)
    return {"q": q, "k": k, "positions": positions, "spec": posattn.RopeSpec(d["D"], base=BASE)}


def reference(inp: dict):
    from posattn.kernels.reference import rope as ref

    spec = inp["spec"]
    tables = spec.tables(inp["positions"].device)
    ang = ref.rope_angles(inp["positions"][None, None], tables)  # positions as [axes, batch, S]
    a = tables.attention_scaling
    return (ref.rotate(inp["q"], ang, spec.rotary_dim, spec.interleaved, a),
            ref.rotate(inp["k"], ang, spec.rotary_dim, spec.interleaved, a))


op = register_op(BenchOp(
    name="rope", title="apply_rope: q and k of one Llama-3-8B layer (Hq 32, Hk 8, D 128), bf16/fp16/fp32",
    make_inputs=make_inputs, reference=reference, sweep=sweep, dtypes=dtypes, bytes=nbytes, flops=flops,
    parse_shape=parse_shape, size_name="tokens", baseline=("transformers", "reference")))


# ---------------------------------------------------------------------------
# posattn backends

def _posattn_factory(backend: str):
    def factory(inp: dict, device_type: str):
        import posattn

        if backend == "reference" and _elements_of(inp) > _REFERENCE_MAX_ELEMENTS[device_type]:
            raise Unsupported("the fp64 reference is timed on small inputs only")
        q, k, pos, spec = inp["q"], inp["k"], inp["positions"], inp["spec"]
        return lambda: posattn.apply_rope(q, k, pos, spec, backend=backend)
    return factory


def _elements_of(inp: dict) -> int:
    return inp["q"].numel() + inp["k"].numel()


for _b in ("cuda", "triton", "cpu", "reference"):
    op.backend(_b, available=posattn_available("rope", _b),
               note="posattn.apply_rope(q, k, positions, spec, backend=%r)" % _b)(_posattn_factory(_b))


# ---------------------------------------------------------------------------
# peers: each used only when importable

def _hf_cos_sin(inp: dict):
    """cos, sin [1, S, D] in the inputs' dtype, from transformers' LlamaRotaryEmbedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    q, k = inp["q"], inp["k"]
    hq, hk, d = q.shape[2], k.shape[2], q.shape[3]
    common = dict(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d,
                  vocab_size=8, num_hidden_layers=1, intermediate_size=8,
                  max_position_embeddings=max(8192, q.shape[1]))
    # rope_theta: read by transformers 4.x, moved into rope_parameters by 5.x
    cfg = LlamaConfig(rope_theta=BASE, **common)
    rot = LlamaRotaryEmbedding(cfg).to(q.device)
    want = inp["spec"].inv_freq().to(q.device)
    if rot.inv_freq.shape != want.shape or not torch.allclose(rot.inv_freq.float(), want, rtol=1e-6, atol=0):
        raise Unsupported("this transformers version's LlamaRotaryEmbedding did not take rope_theta")
    return rot(q, inp["positions"][None])


@op.peer("transformers", available=importable("transformers"),
         note="transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2) on [B,S,H,D]; "
              "cos/sin from LlamaRotaryEmbedding, precomputed")
def _transformers(inp, device_type):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = _hf_cos_sin(inp)
    q, k = inp["q"], inp["k"]
    return lambda: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


_compiled = {}


@op.peer("torch.compile", available=importable("transformers"), full_only=True,
         note="torch.compile(transformers' apply_rotary_pos_emb); compile time not counted")
def _compiled_transformers(inp, device_type):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(apply_rotary_pos_emb)
    fn = _compiled["fn"]
    cos, sin = _hf_cos_sin(inp)
    q, k = inp["q"], inp["k"]
    return lambda: fn(q, k, cos, sin, unsqueeze_dim=2)


@op.peer("liger", available=importable("liger_kernel", cuda_only=True),
         note="Liger-Kernel liger_rotary_pos_emb on [B,H,S,D] views; cos/sin precomputed; rotates in place")
def _liger(inp, device_type):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    cos, sin = _hf_cos_sin(inp)
    qt, kt = inp["q"].transpose(1, 2), inp["k"].transpose(1, 2)

    def fn():
        return liger_rotary_pos_emb(qt, kt, cos, sin)

    return fn, lambda out: (out[0].transpose(1, 2), out[1].transpose(1, 2))


@op.peer("flashinfer", available=importable("flashinfer", cuda_only=True),
         note="FlashInfer apply_rope_pos_ids on [T,H,D]; angles computed in the kernel")
def _flashinfer(inp, device_type):
    apply_rope_pos_ids = flashinfer_fn("apply_rope_pos_ids")
    q, k = inp["q"], inp["k"]
    B, S, hq, d = q.shape
    q3, k3 = q.view(B * S, hq, d), k.view(B * S, k.shape[2], d)
    pos = inp["positions"].repeat(B).to(torch.int32)

    def fn():
        return apply_rope_pos_ids(q3, k3, pos, rotary_dim=d, interleave=False, rope_scale=1.0, rope_theta=BASE)

    return fn, as_qk(q, k)


@op.peer("flash-attn", available=importable("flash_attn", cuda_only=True),
         note="flash-attn apply_rotary_emb on q and k (two calls); cos/sin [S, D/2] precomputed in the input dtype")
def _flash_attn(inp, device_type):
    from flash_attn.layers.rotary import apply_rotary_emb

    q, k = inp["q"], inp["k"]
    spec = inp["spec"]
    ang = inp["positions"].to(torch.float32)[:, None] * spec.inv_freq().to(q.device)[None]
    cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)

    def fn():
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)

    return fn

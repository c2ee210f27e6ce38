"""Benchmark cases for the decode engine's cache writes.

rope_and_cache: one Llama-3-8B layer's new tokens (Hq 32, Hk 8, D 128) rotated and written
into a paged cache (page 16) at scattered slots (a random permutation, as a batch of decode
requests writes one slot each, anywhere). Timed region: q, k, v in; rotated q out, rotated k
and v in the cache. Bytes: q read + written, k and v read + written (the ideal kernel).

kv_compact: B requests with 4096 cached tokens each (paged, page 16) move 8 accepted
tokens out of a 64-node tree region to the end of their prefix. Timed region: the move and
one restore of cache_seqlens (a [B] int32 copy, so that every repetition moves the same
tokens; the op advances the lengths in place).
"""
from __future__ import annotations

import torch

from posattn.bench.ops._common import dtypes_from, flashinfer_fn, importable, parse_dims, posattn_available
from posattn.bench.registry import BenchOp, Shape, Unsupported, register_op

HQ, HK, D, PAGE = 32, 8, 128, 16
BASE = 500000.0

_SWEEPS = {
    ("quick", "cpu"): [1, 16, 256],
    ("full", "cpu"): [1, 16, 256, 4096],
    ("quick", "cuda"): [1, 64, 1024, 16384],
    ("full", "cuda"): [1, 8, 64, 256, 1024, 4096, 16384, 65536],
}
_DTYPES = {
    ("quick", "cpu"): ("float32", "bfloat16"),
    ("full", "cpu"): ("float32", "bfloat16", "float16"),
    ("quick", "cuda"): ("bfloat16",),
    ("full", "cuda"): ("bfloat16", "float16", "float32"),
}
_REFERENCE_MAX_TOKENS = {"cpu": 256, "cuda": 4096}


def _shape(T=1, Hq=HQ, Hk=HK, D_=D) -> Shape:
    return Shape({"T": T, "Hq": Hq, "Hk": Hk, "D": D_}, size=T)


def sweep(mode: str, device_type: str) -> list[Shape]:
    return [_shape(T=t) for t in _SWEEPS[(mode, device_type)]]


def parse_shape(text: str) -> Shape:
    d = parse_dims(text, "rope_and_cache", ("T", "Hq", "Hk", "D"), "T=1024,Hq=32,Hk=8,D=128")
    return _shape(d.get("T", 1), d.get("Hq", HQ), d.get("Hk", HK), d.get("D", D))


def nbytes(shape: Shape, dtype) -> int:
    d = shape.dims
    esize = torch.empty((), dtype=dtype).element_size()
    return 2 * d["T"] * (d["Hq"] + 2 * d["Hk"]) * d["D"] * esize + 16 * d["T"]  # + positions and slots


def flops(shape: Shape, dtype) -> int:
    d = shape.dims
    return 3 * d["T"] * (d["Hq"] + d["Hk"]) * d["D"]


def make_inputs(shape: Shape, dtype, device) -> dict:
    import posattn

    d = shape.dims
    T = d["T"]
    g = torch.Generator().manual_seed(T)
    nblk = -(-4 * T // PAGE) + 1
    return {"q": torch.randn(T, d["Hq"], d["D"], dtype=dtype, device=device),
            "k": torch.randn(T, d["Hk"], d["D"], dtype=dtype, device=device),
            "v": torch.randn(T, d["Hk"], d["D"], dtype=dtype, device=device),
            "positions": torch.randint(0, 8192, (T,), generator=g).to(device),
            "k_cache": torch.zeros(nblk, PAGE, d["Hk"], d["D"], dtype=dtype, device=device),
            "v_cache": torch.zeros(nblk, PAGE, d["Hk"], d["D"], dtype=dtype, device=device),
            "slots": torch.randperm(nblk * PAGE, generator=g)[:T].to(device),
            "spec": posattn.RopeSpec(d["D"], base=BASE)}


def reference(inp: dict):
    if inp["q"].shape[0] > _REFERENCE_MAX_TOKENS[inp["q"].device.type]:
        return None
    from posattn.kernels.reference import rope as ref

    spec = inp["spec"]
    tables = spec.tables(inp["q"].device)
    ang = ref.rope_angles(inp["positions"][None, None], tables)
    a = tables.attention_scaling
    return (ref.rotate(inp["q"][None], ang, spec.rotary_dim, spec.interleaved, a)[0],
            ref.rotate(inp["k"][None], ang, spec.rotary_dim, spec.interleaved, a)[0], inp["v"].double())


def _written(inp):
    """``out -> (q, k rows, v rows)``: the canonical outputs, read back from the cache."""
    s = inp["slots"]

    def canon(out):
        return (out, inp["k_cache"].view(-1, *inp["k_cache"].shape[2:])[s],
                inp["v_cache"].view(-1, *inp["v_cache"].shape[2:])[s])
    return canon


op = register_op(BenchOp(
    name="rope_and_cache", title="rope_and_cache: one Llama-3-8B layer's new tokens into a paged cache (page 16)",
    make_inputs=make_inputs, reference=reference, sweep=sweep, dtypes=dtypes_from(_DTYPES), bytes=nbytes,
    flops=flops, parse_shape=parse_shape, size_name="tokens", baseline=("torch", "reference")))


def _posattn(backend):
    def factory(inp, device_type):
        import posattn

        if backend == "reference" and inp["q"].shape[0] > _REFERENCE_MAX_TOKENS[device_type]:
            raise Unsupported("the fp64 reference is timed on small inputs only")
        a = (inp["q"], inp["k"], inp["v"], inp["positions"], inp["spec"], inp["k_cache"], inp["v_cache"], inp["slots"])
        return (lambda: posattn.rope_and_cache(*a, backend=backend, check=False)), _written(inp)
    return factory


for _b in ("triton", "cpu", "reference"):
    op.backend(_b, available=posattn_available("rope_and_cache", _b),
               note="posattn.rope_and_cache(q, k, v, positions, spec, k_cache, v_cache, slots, backend=%r)" % _b)(
        _posattn(_b))


def _cos_sin(inp):
    spec = inp["spec"]
    ang = inp["positions"].to(torch.float32)[:, None] * spec.inv_freq().to(inp["q"].device)[None]
    return ang.cos(), ang.sin()


@op.peer("torch", note="eager torch: rotate_half RoPE with precomputed fp32 cos/sin, index_copy_ into the "
                       "flattened caches")
def _torch(inp, device_type):
    q, k, v, kc, vc, s = inp["q"], inp["k"], inp["v"], inp["k_cache"], inp["v_cache"], inp["slots"]
    c, sn = _cos_sin(inp)
    c, sn = torch.cat((c, c), -1)[:, None], torch.cat((sn, sn), -1)[:, None]
    h = q.shape[-1] // 2

    def rot(x):
        xf = x.float()
        return (xf * c + torch.cat((-xf[..., h:], xf[..., :h]), -1) * sn).to(x.dtype)

    kf, vf = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])

    def fn():
        qo = rot(q)
        kf.index_copy_(0, s, rot(k))
        vf.index_copy_(0, s, v)
        return qo
    return fn, _written(inp)


@op.peer("vllm", available=importable("vllm", cuda_only=True),
         note="vLLM rotary_embedding (in place on copies of q, k; cos/sin cache precomputed) + reshape_and_cache_flash")
def _vllm(inp, device_type):
    from vllm import _custom_ops as ops

    q, k, v, kc, vc, s, pos = (inp[n] for n in ("q", "k", "v", "k_cache", "v_cache", "slots", "positions"))
    c, sn = _cos_sin(inp)
    full = torch.arange(8192, device=q.device, dtype=torch.float32)[:, None] * inp["spec"].inv_freq().to(q.device)
    cache = torch.cat((full.cos(), full.sin()), -1).to(q.dtype)
    qq, kk = q.clone(), k.clone()
    one = torch.ones((), dtype=torch.float32, device=q.device)

    def fn():
        ops.rotary_embedding(pos, qq, kk, q.shape[-1], cache, True)
        ops.reshape_and_cache_flash(kk, v, kc, vc, s, "auto", one, one)
        return qq
    return fn, _written(inp)


@op.peer("flashinfer", available=importable("flashinfer", cuda_only=True),
         note="FlashInfer apply_rope_pos_ids + append_paged_kv_cache (one request per token, page 16)")
def _flashinfer(inp, device_type):
    import flashinfer

    apply_rope_pos_ids = flashinfer_fn("apply_rope_pos_ids")
    q, k, v, kc, vc, s, pos = (inp[n] for n in ("q", "k", "v", "k_cache", "v_cache", "slots", "positions"))
    T = q.shape[0]
    # each token its own request whose one page is the slot's page
    indptr = torch.arange(T + 1, dtype=torch.int32, device=q.device)
    indices = (s // PAGE).to(torch.int32)
    last_len = (s % PAGE + 1).to(torch.int32)
    batch_idx = torch.arange(T, dtype=torch.int32, device=q.device)
    positions = (s % PAGE).to(torch.int32)

    def fn():
        qo, ko = apply_rope_pos_ids(q, k, pos.to(torch.int32), rotary_dim=q.shape[-1], interleave=False,
                                    rope_theta=BASE)
        flashinfer.page.append_paged_kv_cache(ko, v, batch_idx, positions, (kc, vc), indices, indptr, last_len,
                                              kv_layout="NHD")
        return qo
    return fn, _written(inp)


# ---------------------------------------------------------------------------
# kv_compact

CTX, ACCEPT, TREE = 4096, 8, 64
_CSWEEP = {("quick", "cpu"): [1, 8], ("full", "cpu"): [1, 8, 32], ("quick", "cuda"): [1, 8, 64],
           ("full", "cuda"): [1, 8, 32, 64, 256]}


def _cshape(B=1, Hk=HK, D_=D) -> Shape:
    return Shape({"B": B, "Hk": Hk, "D": D_}, size=B)


def csweep(mode, device_type):
    return [_cshape(B=b) for b in _CSWEEP[(mode, device_type)]]


def cparse(text):
    d = parse_dims(text, "kv_compact", ("B", "Hk", "D"), "B=8,Hk=8,D=128")
    return _cshape(d.get("B", 1), d.get("Hk", HK), d.get("D", D))


def cbytes(shape, dtype):
    d = shape.dims
    return 2 * 2 * d["B"] * ACCEPT * d["Hk"] * d["D"] * torch.empty((), dtype=dtype).element_size()


def cinputs(shape, dtype, device):
    d = shape.dims
    B = d["B"]
    g = torch.Generator().manual_seed(B)
    per = -(-(CTX + TREE) // PAGE)
    nblk = B * per
    bt = torch.randperm(nblk, generator=g).view(B, per).int().to(device)
    src = torch.stack([torch.randperm(TREE, generator=g)[:ACCEPT].sort().values for _ in range(B)]) + CTX
    return {"k_cache": torch.randn(nblk, PAGE, d["Hk"], d["D"], dtype=dtype, device=device),
            "v_cache": torch.randn(nblk, PAGE, d["Hk"], d["D"], dtype=dtype, device=device),
            "lens0": torch.full((B,), CTX, dtype=torch.int32, device=device), "src": src.to(device),
            "counts": torch.full((B,), ACCEPT, device=device), "block_table": bt}


def _moved(inp):
    """The canonical output: the moved rows (k, v) of every request, in order."""
    kc, vc, bt, B = inp["k_cache"], inp["v_cache"], inp["block_table"], inp["src"].shape[0]
    dst = CTX + torch.arange(ACCEPT, device=kc.device)
    pages = bt.long()[:, dst // PAGE]
    return kc[pages, dst % PAGE].reshape(B * ACCEPT, *kc.shape[2:]), vc[pages, dst % PAGE].reshape(B * ACCEPT,
                                                                                                    *kc.shape[2:])


def creference(inp):
    kc, vc, bt, src = inp["k_cache"], inp["v_cache"], inp["block_table"].long(), inp["src"]
    B = src.shape[0]
    pages = torch.gather(bt, 1, src // PAGE)
    return (kc[pages, src % PAGE].reshape(B * ACCEPT, *kc.shape[2:]).double(),
            vc[pages, src % PAGE].reshape(B * ACCEPT, *kc.shape[2:]).double())


cop = register_op(BenchOp(
    name="kv_compact", title="kv_compact: 8 accepted tokens of a 64-node tree per request, 4k cached, page 16",
    make_inputs=cinputs, reference=creference, sweep=csweep, dtypes=dtypes_from(_DTYPES), bytes=cbytes,
    flops=lambda s, d: 0, parse_shape=cparse, size_name="requests", baseline=("torch", "reference")))


def _cposattn(backend):
    def factory(inp, device_type):
        import posattn

        lens = inp["lens0"].clone()
        a = (inp["k_cache"], inp["v_cache"], lens, inp["src"], inp["counts"])

        def fn():
            lens.copy_(inp["lens0"])
            posattn.kv_compact(*a, block_table=inp["block_table"], backend=backend, check=False)
        return fn, lambda out: _moved(inp)
    return factory


for _b in ("triton", "cpu", "reference"):
    cop.backend(_b, available=posattn_available("kv_compact", _b),
                note="posattn.kv_compact(k_cache, v_cache, cache_seqlens, src, counts, block_table=...) + "
                     "a [B] restore of cache_seqlens")(_cposattn(_b))


@cop.peer("torch", note="eager torch: slots from the block table, index_select of the sources then index_copy_ "
                        "into the destinations (gather before scatter, so overlaps are safe)")
def _ctorch(inp, device_type):
    kc, vc, bt, src, lens0 = inp["k_cache"], inp["v_cache"], inp["block_table"].long(), inp["src"], inp["lens0"]
    kf, vf = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
    dst_l = lens0.long()[:, None] + torch.arange(src.shape[1], device=kc.device)

    def fn():
        s = (torch.gather(bt, 1, src // PAGE) * PAGE + src % PAGE).flatten()
        d = (torch.gather(bt, 1, dst_l // PAGE) * PAGE + dst_l % PAGE).flatten()
        kf.index_copy_(0, d, kf.index_select(0, s))
        vf.index_copy_(0, d, vf.index_select(0, s))
    return fn, lambda out: _moved(inp)

"""Tuner adapter for decode_attention's kernels: inputs from a DecodeKey, one launch, a reference check.

A key describes shapes only (batch, capacity and new-token buckets, heads, page size, tree or
causal, window): the inputs fill every request to capacity (the launch is planned from the
capacity, so that is the case a tuned config must serve), pages shuffled over the pool.
Kernels are called directly with the lowered problem (posattn/kernels/reference/decode.py);
the check compares the first and last requests with the fp64 reference.

Keys with ``rotary`` (in-kernel rotation: "q", "k" pre-RoPE cache, "map" ReRoPE(512)) time the
kernel with a DecodeRotary lowered as decode_attention lowers it (RopeSpec(head_dim), key
positions "slots", the key's qk_precision); the check uses the same rotation in fp64.

``keys(shape, dtype, tokens, device_type)`` gives ``posattn tune`` its decode keys for a model
shape: decode (one new token) over caches of ``tokens`` slots per request, batch 1 and 16,
page size 16.
"""
from __future__ import annotations

import torch

from posattn.kernels.reference import decode as ref

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# a sanity bound that catches broken configs; precision tests live in tests/decode
_CHECK_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2, "float64": 1e-9}
WINDOW = 1024          # the window of windowed keys (the cost depends on it, not on its exact value)


def _dims(key):
    B, cap, n = key.batch_bucket, key.kv_bucket, key.q_bucket
    ps = key.page_size if key.paged else cap
    return B, cap, n, ps


def input_bytes(key) -> int:
    elt = torch.empty((), dtype=_DTYPES[key.dtype]).element_size()
    B, cap, n, _ = _dims(key)
    return 2 * B * cap * key.heads_k * key.head_dim * elt + 2 * B * n * key.heads_q * key.head_dim * elt


def make_inputs(key, device, index: int = 0) -> dict:
    dt = _DTYPES[key.dtype]
    B, cap, n, ps = _dims(key)
    g = torch.Generator(device="cpu").manual_seed(1234 + index)
    per = -(-cap // ps)
    pages = B * per
    kc = torch.empty(pages, ps, key.heads_k, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
    vc = torch.empty_like(kc).uniform_(-1, 1)
    bt = torch.randperm(pages, generator=g).to(torch.int32).reshape(B, per).to(device)
    if not key.paged:
        bt = torch.arange(B, dtype=torch.int32, device=device)[:, None]
    cs = torch.full((B,), cap - n, dtype=torch.int32, device=device)
    cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)
    q = torch.empty(B * n, key.heads_q, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
    tm = None
    if key.tree:   # a chain of 4 branches: node i sees the nodes of its branch up to itself
        i = torch.arange(n)
        vis = (i[None, :] <= i[:, None]) & ((i[None, :] % 4) == (i[:, None] % 4)) | (i[None, :] == 0)
        words = -(-n // 32)
        bits = torch.zeros(n, words, dtype=torch.int64)
        for w in range(words):
            seg = vis[:, 32 * w:32 * (w + 1)].to(torch.int64)
            bits[:, w] = (seg << torch.arange(seg.shape[1])).sum(1)
        bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
        tm = bits.repeat(B, 1).to(device)
    x = {"q": q, "k_cache": kc, "v_cache": vc, "block_table": bt, "cache_seqlens": cs, "cu_seqlens_q": cu,
         "tree_mask": tm, "causal": key.causal, "window": WINDOW if key.windowed else -1,
         "scale": key.head_dim ** -0.5, "max_q": n, "out": None, "rot": None, "rot_ref": None}
    if getattr(key, "rotary", ""):
        tb = "triton" if torch.device(device).type == "cuda" else "cpu"
        x["rot"], x["rot_ref"] = (_rotary(key, q, cs, B, n, per * ps, b) for b in (tb, "reference"))
    return x


def _rotary(key, q, cs, B, n, S, backend):
    """The DecodeRotary decode_attention would lower for this key (tables from ``backend``)."""
    from posattn import ReRoPE, RopeSpec
    from posattn.decode.rotary import lower

    dev = q.device
    req = torch.arange(B, device=dev).repeat_interleave(n)
    idx = torch.arange(n, device=dev).repeat(B)
    kp = None if key.rotary == "q" else "slots"
    m = ReRoPE(512) if key.rotary == "map" else None
    return lower(RopeSpec(key.head_dim), kp, key.qk_precision, m, q, None, cs, req, idx, S, backend, {})


def _rows(rot, rows):
    """rot restricted to the query rows ``rows`` (tables are per slot: shared)."""
    if rot is None:
        return None
    import dataclasses

    return dataclasses.replace(rot, qn=rot.qn[rows], qf=None if rot.qf is None else rot.qf[rows],
                               qpos=None if rot.qpos is None else rot.qpos[rows])


def run(kernel, config: dict, x: dict) -> None:
    x["out"] = kernel.fn(x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["cache_seqlens"],
                         x["cu_seqlens_q"], x["tree_mask"], x["causal"], x["window"], x["scale"], None, x["max_q"],
                         config, **({"rot": x["rot"]} if x.get("rot") is not None else {}))


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once; compare the first and last requests' outputs with fp64."""
    x["out"] = None
    run_once()
    if x["out"] is None:
        return "the kernel returned nothing"
    out, lse = x["out"]
    B = x["block_table"].shape[0]
    n = x["max_q"]
    tol = _CHECK_TOL[key.dtype]
    for b in sorted({0, B - 1}):
        rows = slice(b * n, (b + 1) * n)
        sub_cu = torch.tensor([0, n], dtype=torch.int32, device=x["q"].device)
        want, _ = ref.decode_attention(x["q"][rows], x["k_cache"], x["v_cache"], x["block_table"][b:b + 1],
                                       x["cache_seqlens"][b:b + 1], sub_cu,
                                       None if x["tree_mask"] is None else x["tree_mask"][rows], x["causal"],
                                       x["window"], x["scale"], rot=_rows(x.get("rot_ref"), rows))
        got = out[rows].to(torch.float64)
        if not torch.isfinite(got).all():
            return f"request {b}: non-finite output"
        err = ((got - want).abs() - tol * want.abs()).max().item()
        if err > tol:
            return f"request {b}: output differs from the reference by {err + tol:.3g} (bound {tol:g})"
    return None


def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    """posattn tune's decode keys for a model shape (decode steps over ``tokens`` cached slots)."""
    from posattn.decode.attention import DecodeKey
    from posattn.lowered import token_bucket

    out = []
    for t in sorted({token_bucket(max(t, 16)) for t in tokens}):
        for B in (1, 16):
            out.append(DecodeKey(device_type, dtype, shape.head_dim, shape.heads_q, shape.heads_k, 16, True, False,
                                 True, False, 1, t, B))
    return out

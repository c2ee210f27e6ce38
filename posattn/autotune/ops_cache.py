"""Tuner adapter for the cache writes: rope_and_cache (a CacheKey) and kv_compact (a
CompactKey, told apart by its ``width_bucket``): inputs from the key, one launch, a reference check.

rope_and_cache:
Builds T = key.tokens_bucket new tokens ([1, T, H, D] views, as the kernels take them),
a paged cache of page size 16 with room for 2T slots, and a slot mapping that scatters the
tokens over it (a random permutation: decode steps write one slot per request, anywhere).
The check compares the rotated q and the written cache rows of a sample of tokens with
the fp64 reference kernel (plain tables of base 10000; the launch cost does not depend on them).
"""
from __future__ import annotations

import torch

from posattn.autotune.ops_rope import _CHECK_TOL, _DTYPES, _SAMPLE_TOKENS
from posattn.kernels.reference import cache as ref
from posattn.lowered import RopeTables

PAGE = 16


def _compact(key) -> bool:
    return hasattr(key, "width_bucket")


def input_bytes(key) -> int:
    if _compact(key):
        return _c_bytes(key)
    elt = torch.empty((), dtype=_DTYPES[key.dtype]).element_size()
    T = key.tokens_bucket
    return 2 * T * (key.heads_q + 2 * key.heads_k) * key.head_dim * elt + 16 * T


def make_inputs(key, device, index: int = 0) -> dict:
    if _compact(key):
        return _c_inputs(key, device, index)
    dt, T, D = _DTYPES[key.dtype], key.tokens_bucket, key.head_dim
    g = torch.Generator().manual_seed(index)
    q = torch.empty(1, T, key.heads_q, D, dtype=dt, device=device).uniform_(-1, 1)
    k = torch.empty(1, T, key.heads_k, D, dtype=dt, device=device).uniform_(-1, 1)
    v = torch.empty(1, T, key.heads_k, D, dtype=dt, device=device).uniform_(-1, 1)
    nblk = -(-2 * T // PAGE)
    kc = torch.zeros(nblk, PAGE, key.heads_k, D, dtype=dt, device=device)
    slots = torch.randperm(nblk * PAGE, generator=g)[:T].to(device)
    pos3 = (torch.arange(T, dtype=torch.int64) + index * 977).to(device)[None, None]
    half = key.rotary_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, key.rotary_dim, 2, dtype=torch.int64).float() / key.rotary_dim))
    return {"q": q, "qo": torch.empty_like(q), "k": k, "v": v, "kc": kc, "vc": torch.zeros_like(kc), "slots": slots,
            "pos3": pos3, "tables": RopeTables(inv[:half].to(device).contiguous()), "rotary_dim": key.rotary_dim,
            "rotate_k": key.rotate_k}


def run(kernel, config: dict, x: dict) -> None:
    if "src" in x:
        x["lens"].copy_(x["lens0"])        # every run moves the same tokens
        kernel.fn(x["kc"], x["vc"], x["lens"], x["src"], x["counts"], x["bt"], config)
        return
    kernel.fn(x["q"], x["qo"], x["k"], x["v"], x["kc"], x["vc"], x["slots"], x["pos3"], x["tables"],
              x["rotary_dim"], False, x["rotate_k"], config)


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once on NaN-filled outputs; compare sampled tokens with fp64."""
    if _compact(key):
        return _c_check(key, x, run_once)
    for name in ("qo", "kc", "vc"):
        x[name].fill_(float("nan"))
    run_once()
    T = key.tokens_bucket
    idx = torch.unique(torch.linspace(0, T - 1, min(T, _SAMPLE_TOKENS)).round().long())
    cpu = {n: x[n].cpu() for n in ("q", "k", "v")}
    sl = x["slots"].cpu()[idx]
    want_q = torch.empty(1, len(idx), key.heads_q, key.head_dim, dtype=torch.float64)
    kc = torch.zeros(len(idx), 1, key.heads_k, key.head_dim, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    ref.rope_cache_forward(cpu["q"][:, idx], want_q, cpu["k"][:, idx].double(), cpu["v"][:, idx].double(), kc, vc,
                           torch.arange(len(idx)), x["pos3"].cpu()[:, :, idx], x["tables"].to("cpu"),
                           key.rotary_dim, False, key.rotate_k, {})
    tol = _CHECK_TOL[key.dtype]
    page = x["kc"].shape[1]
    got = {"q": x["qo"].cpu()[:, idx].double(),
           "k": x["kc"].cpu()[sl // page, sl % page].double()[:, None],
           "v": x["vc"].cpu()[sl // page, sl % page].double()[:, None]}
    for name, want in (("q", want_q), ("k", kc), ("v", vc)):
        if not torch.isfinite(got[name]).all():
            return f"{name} output has non-finite values (not written?)"
        err = ((got[name] - want).abs() - tol * want.abs()).max().item()
        if err > tol:
            return f"{name} output differs from the reference by {err + tol:.3g} (bound {tol:g})"
    return None


# ---------------------------------------------------------------------------
# kv_compact: B = 8 requests of CTX cached tokens (page 16, pages shuffled), each moving the
# first N / 2 of N = key.width_bucket sources chosen among the 2N slots after its prefix

CTX = 256


def _c_bytes(key) -> int:
    elt = torch.empty((), dtype=_DTYPES[key.dtype]).element_size()
    return 2 * 8 * (CTX + 2 * key.width_bucket) * key.heads_k * key.head_dim * elt


def _c_inputs(key, device, index: int) -> dict:
    dt, N, B = _DTYPES[key.dtype], key.width_bucket, 8
    g = torch.Generator().manual_seed(index)
    per = -(-(CTX + 2 * N) // PAGE)
    shape = (B * per, PAGE, key.heads_k, key.head_dim) if key.paged else (B, per * PAGE, key.heads_k, key.head_dim)
    kc = torch.empty(shape, dtype=dt, device=device).uniform_(-1, 1)
    # N sources out of the 2N slots after the prefix: real moves, overlapping their destinations
    src = torch.stack([torch.randperm(2 * N, generator=g)[:N].sort().values for _ in range(B)]) + CTX
    bt = torch.randperm(B * per, generator=g).view(B, per).int().to(device) if key.paged else None
    lens0 = torch.full((B,), CTX, dtype=torch.int32, device=device)
    return {"kc": kc, "vc": torch.empty_like(kc).uniform_(-1, 1), "lens0": lens0, "lens": lens0.clone(),
            "src": src.to(device), "counts": torch.full((B,), max(1, N // 2), dtype=torch.int64, device=device),
            "bt": bt}


def _c_check(key, x: dict, run_once) -> str | None:
    from posattn.kernels.reference.cache import kv_compact_forward

    want = {n: x[n].cpu().double() for n in ("kc", "vc")}
    lens = x["lens0"].cpu().clone()
    bt = x["bt"].cpu() if x["bt"] is not None else None
    kv_compact_forward(want["kc"], want["vc"], lens, x["src"].cpu(), x["counts"].cpu(), bt, {})
    run_once()
    for n in ("kc", "vc"):
        if not torch.equal(x[n].cpu().double(), want[n]):
            return f"{n}: the cache after the move differs from the reference's"
    if not torch.equal(x["lens"].cpu(), lens):
        return "cache_seqlens: not advanced by counts"
    return None


# ---------------------------------------------------------------------------
# posattn tune's key builders (the command layer: may import the ops' key classes)

def keys(shape, dtype: str, tokens: list[int], device_type: str) -> list:
    """rope_and_cache keys for a model shape: one per token bucket (the new tokens of a step)."""
    from posattn.autotune.keys import make_key
    from posattn.decode.cache import CacheKey
    from posattn.lowered import token_bucket

    return [make_key(CacheKey, device_type=device_type, dtype=dtype, head_dim=shape.head_dim,
                     rotary_dim=shape.rotary_dim, heads_q=shape.heads_q, heads_k=shape.heads_k, rows=1, n_axes=1,
                     dpe=False, rotate_k=True, tokens_bucket=b)
            for b in sorted({token_bucket(t) for t in tokens})]

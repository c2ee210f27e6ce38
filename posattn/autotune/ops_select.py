"""Tuner adapter for token selection's kernels (posattn.select): topk (a TopkKey), scores (a
ScoresKey) and page_scores (a PageScoresKey), told apart by the key's class. Inputs from the key
(rows/caches filled to the key's buckets), one launch, a check against the fp64 reference kernel.
"""
from __future__ import annotations

import torch

from posattn.kernels.reference import select as ref_topk
from posattn.kernels.reference import select_pages as ref_pages
from posattn.kernels.reference import select_scores as ref_scores

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_CHECK_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2, "float64": 1e-9}
PAGE = 16


def _kind(key) -> str:
    return type(key).__name__


def input_bytes(key) -> int:
    k = _kind(key)
    if k == "TopkKey":
        return key.rows_bucket * key.n_bucket * 4
    elt = torch.empty((), dtype=_DTYPES[key.dtype]).element_size()
    if k == "ScoresKey":
        return key.batch_bucket * key.kv_bucket * key.heads_k * key.head_dim * elt
    return 2 * key.batch_bucket * key.pages_bucket * key.heads_k * key.head_dim * elt


def make_inputs(key, device, index: int = 0) -> dict:
    g = torch.Generator().manual_seed(4321 + index)
    k = _kind(key)
    if k == "TopkKey":
        R, N = key.rows_bucket, key.n_bucket
        s = torch.randn(R, N, generator=g).to(device)
        return {"kind": k, "scores": s, "lengths": torch.full((R,), N, dtype=torch.int32, device=device),
                "k": min(key.k_bucket, 8192), "out": None}
    dt = _DTYPES[key.dtype]
    B, HQ, HK, D = key.batch_bucket, key.heads_q, key.heads_k, key.head_dim
    if k == "ScoresKey":
        ps = key.page_size
        per = -(-key.kv_bucket // ps)
        kc = torch.empty(B * per, ps, HK, D, dtype=dt).uniform_(-1, 1).to(device)
        bt = torch.randperm(B * per, generator=g).to(torch.int32).reshape(B, per).to(device)
        cs = torch.full((B,), key.kv_bucket, dtype=torch.int32, device=device)
        q = torch.empty(B, HQ, D).uniform_(-1, 1).to(device)
        return {"kind": k, "q": q, "k_cache": kc, "block_table": bt, "cache_seqlens": cs, "scale": D ** -0.5,
                "out": None}
    P = key.pages_bucket
    kmin = torch.empty(B * P, HK, D, dtype=dt).uniform_(-1, 0).to(device)
    kmax = (kmin + torch.rand(B * P, HK, D).to(dt).to(device))
    ids = torch.randperm(B * P, generator=g).to(torch.int32).reshape(B, P).to(device)
    cs = torch.full((B,), P * PAGE, dtype=torch.int32, device=device)
    return {"kind": k, "q": torch.empty(B, HQ, D).uniform_(-1, 1).to(device), "kmin": kmin, "kmax": kmax,
            "ids": ids, "cache_seqlens": cs, "out": None}


def run(kernel, config: dict, x: dict) -> None:
    if x["kind"] == "TopkKey":
        x["out"] = kernel.fn(x["scores"], x["lengths"], x["k"], 0, 0, config)
    elif x["kind"] == "ScoresKey":
        x["out"] = kernel.fn(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], x["scale"], None,
                             x["q"].shape[-1], False, config)
    else:
        x["out"] = kernel.fn(x["q"], x["kmin"], x["kmax"], x["ids"], x["cache_seqlens"], PAGE, config)


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once; topk must match the reference exactly on the first and last rows,
    the scores within a sanity bound on the first and last requests."""
    x["out"] = None
    run_once()
    if x["out"] is None:
        return "the kernel returned nothing"
    if x["kind"] == "TopkKey":
        R = x["scores"].shape[0]
        for r in sorted({0, R - 1}):
            want = ref_topk.topk(x["scores"][r:r + 1], x["lengths"][r:r + 1], x["k"], 0, 0)
            if not torch.equal(x["out"][r:r + 1].cpu(), want.cpu()):
                return f"row {r}: chosen indices differ from the reference"
        return None
    B = x["q"].shape[0]
    tol = _CHECK_TOL[key.dtype]
    for b in sorted({0, B - 1}):
        if x["kind"] == "ScoresKey":
            want = ref_scores.scores(x["q"][b:b + 1], x["k_cache"], x["block_table"][b:b + 1],
                                     x["cache_seqlens"][b:b + 1], x["scale"], None, x["q"].shape[-1], False)
        else:
            want = ref_pages.page_scores(x["q"][b:b + 1], x["kmin"], x["kmax"], x["ids"][b:b + 1],
                                         x["cache_seqlens"][b:b + 1], PAGE)
        got = x["out"][b:b + 1].to(torch.float64)
        w = want.to(torch.float64)
        fin = torch.isfinite(w)
        if not torch.equal(torch.isfinite(got), fin):
            return f"request {b}: -inf entries differ from the reference"
        err = ((got[fin] - w[fin]).abs() - tol * w[fin].abs()).max().item() if fin.any() else 0.0
        if err > tol:
            return f"request {b}: output differs from the reference by {err + tol:.3g} (bound {tol:g})"
    return None

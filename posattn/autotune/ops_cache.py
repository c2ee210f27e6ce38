"""Tuner adapter for rope_and_cache: inputs from a CacheKey, one launch, a reference check.

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


def input_bytes(key) -> int:
    elt = torch.empty((), dtype=_DTYPES[key.dtype]).element_size()
    T = key.tokens_bucket
    return 2 * T * (key.heads_q + 2 * key.heads_k) * key.head_dim * elt + 16 * T


def make_inputs(key, device, index: int = 0) -> dict:
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
    kernel.fn(x["q"], x["qo"], x["k"], x["v"], x["kc"], x["vc"], x["slots"], x["pos3"], x["tables"],
              x["rotary_dim"], False, x["rotate_k"], config)


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once on NaN-filled outputs; compare sampled tokens with fp64."""
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

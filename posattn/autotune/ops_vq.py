"""Tuner adapter for posattn.vq's centroid-lookup scores (vq_code_scores, a VqScoresKey): a paged
int16 codes cache filled to the key's buckets, one launch, a check against the fp64 reference."""
from __future__ import annotations

import torch

from posattn.kernels.reference import vq as ref


def input_bytes(key) -> int:
    return key.batch_bucket * key.kv_bucket * key.heads_k * 2 + key.heads_k * key.codes_bucket * key.head_dim * 4


def make_inputs(key, device, index: int = 0) -> dict:
    g = torch.Generator().manual_seed(8765 + index)
    B, HQ, HK, D, C, ps = key.batch_bucket, key.heads_q, key.heads_k, key.head_dim, key.codes_bucket, key.page_size
    per = -(-key.kv_bucket // ps)
    codes = torch.randint(0, C, (B * per, ps, HK), generator=g).to(torch.int16).to(device)
    bt = torch.randperm(B * per, generator=g).to(torch.int32).reshape(B, per).to(device)
    far = torch.full((B,), key.kv_bucket, dtype=torch.int32, device=device)
    return {"qf": torch.randn(B, HQ, D, generator=g).to(device), "cent": torch.randn(HK, C, D, generator=g).to(device),
            "codes": codes, "block_table": bt, "far_len": far, "scale": D ** -0.5,
            "out": torch.empty(B, HQ, per * ps, dtype=torch.float32, device=device), "done": False}


def run(kernel, config: dict, x: dict) -> None:
    kernel.fn(x["qf"], x["cent"], x["codes"], x["block_table"], x["far_len"], x["scale"], x["out"], config)
    x["done"] = True


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once (on a poisoned output); the first and last requests must match the
    reference within fp32 dot-product rounding."""
    x["out"].fill_(float("nan"))
    x["done"] = False
    run_once()
    if not x["done"]:
        return "the kernel did not run"
    B = x["qf"].shape[0]
    D = x["qf"].shape[-1]
    for b in sorted({0, B - 1}):
        want = torch.empty_like(x["out"][b:b + 1])
        ref.code_scores(x["qf"][b:b + 1].double(), x["cent"], x["codes"], x["block_table"][b:b + 1],
                        x["far_len"][b:b + 1], x["scale"], want)
        got = x["out"][b:b + 1]
        if not torch.equal(torch.isinf(got), torch.isinf(want)) or torch.isnan(got).any():
            return f"request {b}: -inf (or unwritten) entries differ from the reference"
        fin = torch.isfinite(want)
        bound = 4 * D * 2.0 ** -24 * float(x["qf"].abs().max() * x["cent"].abs().max() * D ** 0.5) + 1e-6
        err = float((got[fin].double() - want[fin].double()).abs().max()) if fin.any() else 0.0
        if err > bound:
            return f"request {b}: output differs from the reference by {err:.3g} (bound {bound:.3g})"
    return None

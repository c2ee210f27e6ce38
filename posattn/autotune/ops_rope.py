"""Tuner adapter for the rope kernels: inputs from a RopeKey, one launch, a reference check.

Builds ``[1, S, H, D]`` inputs with ``S = key.tokens_bucket`` (bshd,
contiguous), positions ``[1, 1, S]`` (axes, batch, tokens), and the tables of
base 10000 (the launch cost does not depend on the base). Kernels are called directly
(never through the public op); the check compares a sample of tokens with
the fp64 reference kernel.
"""
from __future__ import annotations

import torch

from posattn.kernels.reference import rope as ref
from posattn.lowered import RopeTables

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# A sanity bound that catches broken configs (wrong results are O(1) off);
# the precision tests live in tests/rope with tests/_tol.py.
_CHECK_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2, "float64": 1e-9}
_SAMPLE_TOKENS = 48


def _dtype(key) -> torch.dtype:
    return _DTYPES[key.dtype]


def input_bytes(key) -> int:
    elt = torch.empty((), dtype=_dtype(key)).element_size()
    pos = 8 if key.pos_dtype == "int64" else 4
    s = key.tokens_bucket
    return 2 * s * (key.heads_q + key.heads_k) * key.head_dim * elt + s * pos


def make_inputs(key, device, index: int = 0) -> dict:
    dt = _dtype(key)
    s = key.tokens_bucket
    q = torch.empty(1, s, key.heads_q, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
    k = (torch.empty(1, s, key.heads_k, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
         if key.heads_k else None)
    pdt = torch.int64 if key.pos_dtype == "int64" else torch.int32
    pos3 = (torch.arange(s, dtype=torch.int64, device=device) + index * 977).to(pdt)[None, None]
    half = key.rotary_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, key.rotary_dim, 2, dtype=torch.int64).float() / key.rotary_dim))
    return {"q": q, "qo": torch.empty_like(q), "k": k, "ko": torch.empty_like(k) if k is not None else None,
            "pos3": pos3, "tables": RopeTables(inv[:half].to(device).contiguous()), "rotary_dim": key.rotary_dim,
            "interleaved": key.interleaved}


def run(kernel, config: dict, x: dict) -> None:
    kernel.fn(x["q"], x["qo"], x["k"], x["ko"], x["pos3"], x["tables"], x["rotary_dim"], x["interleaved"],
              1.0, config)


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once on NaN-filled outputs; compare sampled tokens with fp64."""
    idx = run_poisoned(key, x, run_once)
    pos = x["pos3"][:, :, idx.to(x["pos3"].device)].cpu()
    ang = ref.rope_angles(pos, x["tables"].to("cpu"))
    return compare_sampled(key, x, idx, lambda xs: ref.rotate(xs, ang, key.rotary_dim, key.interleaved))


def run_poisoned(key, x: dict, run_once) -> torch.Tensor:
    """Fill the outputs ``x["qo"]``/``x["ko"]`` with NaN, launch once; the token indices to check."""
    x["qo"].fill_(float("nan"))
    if x["ko"] is not None:
        x["ko"].fill_(float("nan"))
    run_once()
    s = key.tokens_bucket
    n = min(s, _SAMPLE_TOKENS)
    return torch.unique(torch.linspace(0, s - 1, n).round().long())


def compare_sampled(key, x: dict, idx: torch.Tensor, reference) -> str | None:
    """Why tokens ``idx`` of q->qo / k->ko differ from ``reference(x[:, idx] on the CPU)`` (fp64), or None."""
    tol = _CHECK_TOL[key.dtype]
    for name, out in (("q", "qo"), ("k", "ko")):
        if x[name] is None:
            continue
        dev_idx = idx.to(x[name].device)
        want = reference(x[name][:, dev_idx].cpu())
        got = x[out][:, dev_idx].cpu().to(torch.float64)
        if not torch.isfinite(got).all():
            return f"{name} output has non-finite values (not written?)"
        err = ((got - want).abs() - tol * want.abs()).max().item()
        if err > tol:
            return f"{name} output differs from the reference by {err + tol:.3g} (bound {tol:g})"
    return None

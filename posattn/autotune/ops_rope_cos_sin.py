"""Tuner adapter for the cos/sin-table rope kernels: inputs from a CosSinKey, one launch, a reference check.

Builds ``[1, S, H, D]`` q/k with ``S = key.tokens_bucket`` (bshd, contiguous)
and tables of base 10000 in ``key.table_dtype`` (the launch cost does not
depend on the base), in the form the key names:

* ``pos_dtype`` set: a ``[S, R]`` cos_sin_cache (cos then sin; the vLLM /
  FlashInfer form) and positions ``[1, S]`` that visit its rows out of order;
* ``pos_dtype`` "": per-token tables ``[1, S, R/2]``, or with ``split`` the
  transformers-style ``[1, S, R]`` cos and sin whose two halves are read
  separately.

Kernels are called directly (never through the public op); the check compares
a sample of tokens with the fp64 reference kernel.
"""
from __future__ import annotations

import torch

from posattn.autotune.ops_rope import _DTYPES, compare_sampled, run_poisoned
from posattn.kernels.reference import rope_cos_sin as ref


def _elt(name: str) -> int:
    return torch.empty((), dtype=_DTYPES[name]).element_size()


def input_bytes(key) -> int:
    s, r = key.tokens_bucket, key.rotary_dim
    tables = s * r * (2 if key.split else 1) * _elt(key.table_dtype)
    pos = 0 if not key.pos_dtype else s * (8 if key.pos_dtype == "int64" else 4)
    return 2 * s * (key.heads_q + key.heads_k) * key.head_dim * _elt(key.dtype) + tables + pos


def _tables(key, device, rows: int):
    """(c1, s1, c2, s2) [1, rows, R/2] views of tables in the key's form."""
    r, half = key.rotary_dim, key.rotary_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = torch.arange(rows, dtype=torch.float64)[:, None] * inv[None, :]  # [rows, R/2]
    tdt = _DTYPES[key.table_dtype]
    if key.split:  # [1, rows, R] cos and sin, the pair's second element from the other half
        full = torch.cat((ang, ang), -1) if not key.interleaved else ang.repeat_interleave(2, -1)
        cos, sin = (t.to(tdt).to(device)[None] for t in (full.cos(), full.sin()))
        if key.interleaved:
            return cos[..., 0::2], sin[..., 0::2], cos[..., 1::2], sin[..., 1::2]
        return cos[..., :half], sin[..., :half], cos[..., half:], sin[..., half:]
    if key.pos_dtype:  # one [rows, R] cache: cos then sin
        cache = torch.cat((ang.cos(), ang.sin()), -1).to(tdt).to(device)[None]
        c, s = cache[..., :half], cache[..., half:]
    else:
        c, s = (t.to(tdt).to(device)[None] for t in (ang.cos(), ang.sin()))
    return c, s, c, s


def make_inputs(key, device, index: int = 0) -> dict:
    dt = _DTYPES[key.dtype]
    s = key.tokens_bucket
    q = torch.empty(1, s, key.heads_q, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
    k = (torch.empty(1, s, key.heads_k, key.head_dim, dtype=dt, device=device).uniform_(-1, 1)
         if key.heads_k else None)
    pos2 = None
    if key.pos_dtype:
        pdt = torch.int64 if key.pos_dtype == "int64" else torch.int32
        # every row once, in a different order for each input set
        pos2 = ((torch.arange(s, dtype=torch.int64) * 977 + index * 131) % s).to(pdt).to(device)[None]
    c1, s1, c2, s2 = _tables(key, device, s)
    return {"q": q, "qo": torch.empty_like(q), "k": k, "ko": torch.empty_like(k) if k is not None else None,
            "tables": (c1, s1, c2, s2), "pos2": pos2, "rotary_dim": key.rotary_dim,
            "interleaved": key.interleaved}


def run(kernel, config: dict, x: dict) -> None:
    kernel.fn(x["q"], x["qo"], x["k"], x["ko"], *x["tables"], x["pos2"], x["rotary_dim"], x["interleaved"],
              1.0, config)


def reference_check(key, x: dict, run_once) -> str | None:
    """Run the candidate once on NaN-filled outputs; compare sampled tokens with fp64."""
    idx = run_poisoned(key, x, run_once)
    rows_idx = x["pos2"][:, idx.to(x["pos2"].device)].cpu() if x["pos2"] is not None else idx[None]
    rows = [ref.gather_rows(t.cpu(), rows_idx, 1, len(idx)) for t in x["tables"]]
    return compare_sampled(key, x, idx, lambda xs: ref.rotate_tables(xs, *rows, key.rotary_dim, key.interleaved))

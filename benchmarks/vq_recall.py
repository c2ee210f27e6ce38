"""Recall of the exact top-k under the windowed rotation: query-aware VQ vs plain k-means (equal code
count) vs Quest page bounds (equal memory), on synthetic anisotropic data and on keys/queries
recorded from a small random-weight transformers model.

    python benchmarks/vq_recall.py                       # the figures in docs/vq.md
    python benchmarks/vq_recall.py --tokens 2048 --codes 32 --model-tokens 256   # tiny

What is measured: far keys (distance > window) are scored as qf . k with qf the query rotated at
the window distance and k the pre-RoPE key (ReRoPE's far rotation); the window itself is exact in
every method, so it is left out. For each held-out query and query head, the k highest exact
scores are the target; a method's recall is the fraction of them among the k tokens it chooses:
- VQ (query-aware): posattn.vq.fit(keys, fit_queries, C) -> scores qf . centroid[code];
- k-means: posattn.vq.fit(keys, None, C), the same C (M = I);
- Quest: pages of P tokens, the per-page bound sum_d max(q_d min_d, q_d max_d), the best k / P
  pages; P chosen so that its summaries (2 x D bf16 per page) take the memory of VQ's codes
  (int16 per token) plus its codebook (C x D bf16 per KV head): 4D / P ~= 2 + 2CD / T bytes.
The queries that fit the codebook are not the ones measured (a held-out split).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posattn import vq  # noqa: E402


def synthetic(T: int, HK: int, G: int, D: int, rank: int, Tq: int, seed: int):
    """keys [T, Hk, D] anisotropic (per-dim scales decaying 10x, a shared mean) and far queries
    [Tq, Hk * G, D] in a rank-`rank` subspace per KV head (plus 5 % isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1, D)
    keys = torch.randn(T, HK, D, generator=g) * scales + 0.5 * torch.randn(1, HK, D, generator=g)
    basis = torch.linalg.qr(torch.randn(HK, D, rank, generator=g)).Q.transpose(1, 2)        # [Hk, r, D]
    coef = torch.randn(Tq, HK, G, rank, generator=g) * torch.linspace(2, 1, rank)
    q = torch.einsum("thgr,hrd->thgd", coef, basis).reshape(Tq, HK * G, D)
    q = q + 0.05 * q.std() * torch.randn(Tq, HK * G, D, generator=g)
    return keys, q


def recorded(T: int, window: int, seed: int):
    """Pre-RoPE keys [T, Hk, D] and far queries [T, Hq, D] (rotated at `window`) of the last layer of
    a random-weight Llama on random tokens, recorded with hooks on k_proj / q_proj."""
    import transformers

    from posattn.kernels.reference.select_scores import rotate_table
    from posattn.rope.hf import from_hf_config

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=max(4096, 2 * T))
    model = transformers.LlamaForCausalLM(cfg).eval()
    att = model.model.layers[-1].self_attn
    rec = {}
    hq = att.q_proj.register_forward_hook(lambda m, i, o: rec.__setitem__("q", o))
    hk = att.k_proj.register_forward_hook(lambda m, i, o: rec.__setitem__("k", o))
    ids = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids)
    hq.remove()
    hk.remove()
    D = cfg.hidden_size // cfg.num_attention_heads
    q = rec["q"][0].reshape(T, cfg.num_attention_heads, D).float()
    k = rec["k"][0].reshape(T, cfg.num_key_value_heads, D).float()
    spec = from_hf_config(cfg)
    t = spec.tables(torch.device("cpu"))
    ang = float(window) * t.inv_freq.to(torch.float64)
    qf = rotate_table(q.double(), torch.cos(ang), torch.sin(ang), D, bool(spec.interleaved)).float()
    return k, qf


def _topk_sets(s: torch.Tensor, k: int) -> torch.Tensor:
    """s [N, T] -> bool [N, T], the k highest of each row."""
    m = torch.zeros_like(s, dtype=torch.bool)
    return m.scatter_(1, s.topk(k, dim=1).indices, True)


def _recall(approx_sel: torch.Tensor, exact_sel: torch.Tensor, k: int) -> float:
    return float((approx_sel & exact_sel).sum(1).float().mean() / k)


def quest_page(D: int, C: int, T: int) -> int:
    """Quest's page size at VQ's memory: 4D / P ~= 2 + 2CD / T bytes per token (power of two)."""
    per_token = 2.0 + 2.0 * C * D / T
    return 1 << max(0, round(math.log2(4.0 * D / per_token)))


def measure(keys: torch.Tensor, queries: torch.Tensor, n_codes: int, k: int, *, test_frac: float = 0.25,
            iters: int = 15, seed: int = 0) -> dict:
    """keys [T, Hk, D], far queries [Tq, Hq, D] -> {method: recall@k} (+ page size and bytes/token)."""
    T, HK, D = keys.shape
    Tq, HQ, _ = queries.shape
    G = HQ // HK
    n_test = max(1, int(Tq * test_frac))
    fit_q, test_q = queries[:Tq - n_test], queries[Tq - n_test:]
    exact = torch.einsum("nhd,thd->nht", test_q, keys.repeat_interleave(G, dim=1))               # [N, Hq, T]
    ex_sel = _topk_sets(exact.reshape(-1, T), k)
    out = {}
    for name, qs in (("vq_query_aware", fit_q), ("kmeans", None)):
        cb = vq.fit(keys, qs, n_codes, iters=iters, seed=seed)
        codes = vq.assign(keys, cb, backend="reference").long()                                  # [T, Hk]
        k_hat = cb.centroids[torch.arange(HK)[None, :], codes]                                   # [T, Hk, D]
        approx = torch.einsum("nhd,thd->nht", test_q, k_hat.repeat_interleave(G, dim=1))
        # ties (tokens sharing a code) are broken by a tiny exact-independent jitter, not by index
        jitter = 1e-6 * approx.abs().max() * torch.rand(approx.shape, generator=torch.Generator().manual_seed(1))
        out[name] = _recall(_topk_sets((approx + jitter).reshape(-1, T), k), ex_sel, k)
    P = quest_page(D, n_codes, T)
    npg = -(-T // P)
    pad = npg * P - T
    kp = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad))
    valid = torch.arange(npg * P) < T
    big = torch.finfo(torch.float32).max
    kmin = torch.where(valid[:, None, None], kp, torch.full_like(kp, big)).reshape(npg, P, HK, D).amin(1)
    kmax = torch.where(valid[:, None, None], kp, torch.full_like(kp, -big)).reshape(npg, P, HK, D).amax(1)
    kmin, kmax = kmin.repeat_interleave(G, dim=1), kmax.repeat_interleave(G, dim=1)              # [npg, Hq, D]
    ub = torch.maximum(test_q[:, :, None, :] * kmin.transpose(0, 1)[None],
                       test_q[:, :, None, :] * kmax.transpose(0, 1)[None]).sum(-1)              # [N, Hq, npg]
    pages = ub.reshape(-1, npg).topk(max(1, k // P), dim=1).indices
    sel = torch.zeros(pages.shape[0], npg, dtype=torch.bool).scatter_(1, pages, True)
    sel = sel[:, :, None].expand(-1, npg, P).reshape(-1, npg * P)[:, :T]
    out["quest"] = _recall(sel, ex_sel, k)
    out["quest_page"] = P
    out["quest_tokens"] = max(1, k // P) * P          # tokens Quest attends (k, unless k < P)
    out["bytes_per_token"] = 2.0 + 2.0 * n_codes * D / T
    out["k"] = k
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads-k", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--model-tokens", type=int, default=4096, help="0 skips the recorded-model case")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = {}
    keys, q = synthetic(a.tokens, a.heads_k, a.group, a.dim, a.rank, a.queries, a.seed)
    res["synthetic"] = measure(keys, q, a.codes, a.k, iters=a.iters, seed=a.seed)
    res["synthetic"]["case"] = (f"T={a.tokens} Hk={a.heads_k} G={a.group} D={a.dim} rank={a.rank} C={a.codes} "
                                f"k={a.k}")
    if a.model_tokens:
        k2, q2 = recorded(a.model_tokens, a.window, a.seed)
        kk = max(1, a.k * a.model_tokens // a.tokens)
        C2 = max(1, a.codes * a.model_tokens // a.tokens)
        res["model"] = measure(k2, q2, C2, kk, iters=a.iters, seed=a.seed)
        res["model"]["case"] = (f"random-weight Llama (last of 2 layers, Hq 4 / Hk 2, D 64), T={a.model_tokens} "
                                f"W={a.window} C={C2} k={kk}")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{'data':10} {'VQ (query-aware)':>17} {'k-means':>8} {'Quest':>6} {'page':>5} {'B/token':>8}  case")
        for name, r in res.items():
            note = f" (Quest attends {r['quest_tokens']} tokens: k < page)" if r["quest_tokens"] != r["k"] else ""
            print(f"{name:10} {r['vq_query_aware']:17.3f} {r['kmeans']:8.3f} {r['quest']:6.3f} {r['quest_page']:5d} "
                  f"{r['bytes_per_token']:8.2f}  {r['case']}{note}")
    return res


if __name__ == "__main__":
    main()

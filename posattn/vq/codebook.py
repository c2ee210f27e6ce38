"""Query-aware vector quantization of pre-RoPE keys (A2ATS): the codebook and its fit.

A far key k (distance >= window) is scored as qf . k with qf the query rotated at the window
distance and k unrotated (ReRoPE's far rotation, posattn/position_maps.py). Replacing k by a
centroid c costs (qf . (k - c))^2 in the score, so the codebook that minimises the expected score
error over the queries is k-means under the metric M = E[qf qf^T]:

    E_q (q . (k - c))^2 = (k - c)^T M (k - c) = |(k - c) L|^2,   M = L L^T (Cholesky),

i.e. k-means in the whitened space y = k L. A centroid is the mean of its cluster's keys in
either space (the map is linear), so the centroids are kept in the key space. ``queries=None``
fits with M = I: plain k-means (the baseline of benchmarks/vq_recall.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posattn import _validate as V

# relative ridge added to M (times trace(M) / D): queries that live in a low-dimensional subspace
# (as real ones do) make M rank-deficient; the ridge keeps the Cholesky factor defined and gives the
# directions no query sees a small, not zero, weight
RIDGE = 1e-4
_CHUNK = 8192      # keys per distance block in the Lloyd steps (bounds memory at T x C)


@dataclass(frozen=True, eq=False)
class Codebook:
    """One codebook per KV head.

    Attributes:
        centroids: fp32 [Hk, C, D], in the pre-RoPE key space (what scores dots with).
        metric_centroids: fp32 [Hk, C, D], M c (what assign dots keys with).
        centroid_norms: fp32 [Hk, C], c^T M c; assign picks argmin_c (c^T M c - 2 k^T M c).
        query_aware: False when fitted without queries (M = I, plain k-means).
    """

    centroids: torch.Tensor
    metric_centroids: torch.Tensor
    centroid_norms: torch.Tensor
    query_aware: bool = True

    @property
    def heads_k(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_codes(self) -> int:
        return self.centroids.shape[1]

    @property
    def head_dim(self) -> int:
        return self.centroids.shape[2]

    @property
    def code_dtype(self) -> torch.dtype:
        """int16 when every code fits (C <= 32768), else int32."""
        return torch.int16 if self.n_codes <= 32768 else torch.int32

    @property
    def device(self) -> torch.device:
        return self.centroids.device

    def to(self, device) -> "Codebook":
        return Codebook(self.centroids.to(device), self.metric_centroids.to(device),
                        self.centroid_norms.to(device), self.query_aware)


def check_codebook(codebook, heads_k: int, head_dim: int, device, what: str = "keys") -> Codebook:
    """The codebook, after checking its type, head count, head_dim and device against ``what``'s."""
    if not isinstance(codebook, Codebook):
        raise TypeError(f"codebook must be a posattn.vq.Codebook (from posattn.vq.fit); got {type(codebook).__name__}")
    if codebook.heads_k != heads_k:
        raise ValueError(f"codebook has {codebook.heads_k} KV heads but {what} have {heads_k}")
    if codebook.head_dim != head_dim:
        raise ValueError(f"codebook has head_dim {codebook.head_dim} but {what} have head_dim {head_dim}")
    if codebook.device != torch.device(device):
        raise ValueError(f"codebook is on {codebook.device} but {what} are on {device}; move it with codebook.to()")
    return codebook


def _check_fit(keys, queries, n_codes, iters, seed):
    V.float_tensor(keys, "keys")
    if keys.dim() != 3:
        raise ValueError(f"keys must be [T, Hk, D] (pre-RoPE keys); got shape {tuple(keys.shape)}")
    T, HK, D = keys.shape
    if T < 1 or HK < 1 or D < 1:
        raise ValueError(f"keys must have at least one token, head and dim; got shape {tuple(keys.shape)}")
    if queries is not None:
        V.float_tensor(queries, "queries")
        V.same_device(keys, "keys", queries=queries)
        if queries.dim() != 3 or queries.shape[2] != D:
            raise ValueError(f"queries must be [Tq, Hq, D={D}] (window-rotated queries); got shape "
                             f"{tuple(queries.shape)}")
        if queries.shape[0] < 1 or queries.shape[1] < HK or queries.shape[1] % HK:
            raise ValueError(f"queries must have Tq >= 1 and Hq a multiple of the keys' Hk={HK}; got shape "
                             f"{tuple(queries.shape)}")
    if isinstance(n_codes, bool) or not isinstance(n_codes, int):
        raise TypeError(f"n_codes must be an int, got {type(n_codes).__name__}")
    if n_codes < 1 or n_codes > 2 ** 31 - 1:
        raise ValueError(f"n_codes must be >= 1 (codes per KV head); got {n_codes}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int (Lloyd iterations); got {iters!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def metric(queries: torch.Tensor | None, heads_k: int, D: int, device) -> torch.Tensor:
    """fp64 [Hk, D, D]: each KV head's E[q q^T] over its GQA group's queries (plus the ridge), or I."""
    eye = torch.eye(D, dtype=torch.float64, device=device)
    if queries is None:
        return eye.expand(heads_k, D, D).clone()
    Tq, HQ, _ = queries.shape
    q = queries.to(torch.float64).reshape(Tq, heads_k, HQ // heads_k, D).transpose(0, 1).reshape(heads_k, -1, D)
    m = q.transpose(1, 2) @ q / q.shape[1]                                        # [Hk, D, D]
    tr = torch.diagonal(m, dim1=1, dim2=2).sum(-1) / D                           # [Hk]
    # a head whose queries are all zero gets M = I (nothing to weigh by)
    m = torch.where((tr > 0)[:, None, None], m, eye)
    tr = torch.where(tr > 0, tr, torch.ones_like(tr))
    return m + RIDGE * tr[:, None, None] * eye


def _nearest(y: torch.Tensor, cy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [T, D], centres cy [C, D] -> (index [T] int64, squared distance [T]), ties to the lower index."""
    cn = (cy * cy).sum(-1)
    idx, dist = [], []
    for t0 in range(0, y.shape[0], _CHUNK):                  # blocks of keys, not a loop per key
        yc = y[t0:t0 + _CHUNK]
        d = cn[None, :] - 2.0 * (yc @ cy.T)
        m, i = d.min(dim=1)
        idx.append(i)
        dist.append((m + (yc * yc).sum(-1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def _kmeans_pp(y: torch.Tensor, C: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn's): each pick samples 2 + log(C) candidates with
    probability proportional to their squared distance to the chosen centres and keeps the one that
    lowers the potential most; [C] indices into y. A loop over the C picks, each vectorised."""
    T = y.shape[0]
    trials = 2 + int(math.log(max(C, 1)))
    yn = (y * y).sum(-1)

    def sqdist(rows):                                   # [n] picks -> [n, T] squared distances (one matmul)
        return (yn[rows][:, None] + yn[None, :] - 2.0 * (y[rows] @ y.T)).clamp_min_(0)

    first = int(torch.randint(T, (1,), generator=gen))
    picks = [first]
    d = sqdist(torch.tensor([first], device=y.device))[0]
    d[first] = 0
    # below this potential the keys left coincide with centres up to the matmul's rounding
    floor = 1e-6 * float(yn.sum())
    for _ in range(1, min(C, T)):
        total = d.sum()
        if not bool(total > floor):
            break
        p = (d / total).to(torch.float64).cpu()
        cand = torch.multinomial(p, trials, replacement=True, generator=gen).to(y.device)
        dc = torch.minimum(d[None, :], sqdist(cand))                                        # [trials, T]
        best = int(dc.sum(-1).argmin())
        picks.append(int(cand[best]))
        d = dc[best]
        d[picks[-1]] = 0
    if len(picks) < C:                                  # fewer distinct keys than codes: repeat picks
        extra = torch.randint(len(picks), (C - len(picks),), generator=gen)
        picks += [picks[int(j)] for j in extra]
    return torch.tensor(picks, dtype=torch.int64, device=y.device)


def _fit_head(k: torch.Tensor, L: torch.Tensor, C: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """k [T, D] fp32 keys, L [D, D] the metric's Cholesky factor -> fp32 centroids [C, D]."""
    y = k @ L                                                                   # whitened keys
    # distances by matmul lose what a common offset adds to the norms: centre the whitened keys
    mu = y.mean(0)
    y = y - mu
    cent = k[_kmeans_pp(y, C, gen)].clone()
    for _ in range(iters):
        idx, dist = _nearest(y, cent @ L - mu)
        sums = torch.zeros_like(cent).index_add_(0, idx, k)
        cnt = torch.zeros(C, dtype=k.dtype, device=k.device).index_add_(0, idx, torch.ones_like(dist))
        new = sums / cnt.clamp_min(1)[:, None]
        empty = cnt == 0
        n_empty = int(empty.sum())
        if n_empty:
            # an empty cluster takes one of the worst-served keys (distinct ones), not a stale centre;
            # with more empty clusters than keys the rest keep their old centre
            far = dist.topk(min(n_empty, dist.shape[0])).indices
            slots = empty.nonzero().flatten()[:far.shape[0]]
            new[slots] = k[far]
            rest = empty.clone()
            rest[slots] = False
            new = torch.where(rest[:, None], cent, new)
        cent = new
    return cent


def fit(keys: torch.Tensor, queries: torch.Tensor | None, n_codes: int, *, iters: int = 20,
        seed: int = 0) -> Codebook:
    """Fit one query-aware codebook per KV head.

    Args:
        keys: [T, Hk, D] pre-RoPE keys (any float dtype).
        queries: [Tq, Hq, D] a sample of queries rotated at the window distance (what far keys are
            scored with); KV head h's metric uses its GQA group's heads h*G .. h*G+G-1. None: plain
            k-means (M = I).
        n_codes: C, codes per KV head (>= 1; more codes than keys repeats centroids).
        iters: Lloyd iterations after k-means++ seeding; seed: the seeding's RNG seed.
    Returns:
        a :class:`Codebook` on the keys' device. Deterministic given ``seed`` (on one device).
        The metric and its Cholesky factor are fp64, the Lloyd steps fp32 on the keys' device.
    """
    _check_fit(keys, queries, n_codes, iters, seed)
    T, HK, D = keys.shape
    dev = keys.device
    M = metric(queries, HK, D, dev)                                             # fp64 [Hk, D, D]
    L = torch.linalg.cholesky(M)
    gen = torch.Generator().manual_seed(seed)
    k32 = keys.to(torch.float32)
    cents = torch.stack([_fit_head(k32[:, h].contiguous(), L[h].to(torch.float32), n_codes, iters, gen)
                         for h in range(HK)])                                   # [Hk, C, D]
    mc = (cents.to(torch.float64) @ M).to(torch.float32)                        # M symmetric: c M = (M c)^T
    cn = (cents.to(torch.float64) @ M * cents.to(torch.float64)).sum(-1).to(torch.float32)
    return Codebook(cents.contiguous(), mc.contiguous(), cn.contiguous(), queries is not None)

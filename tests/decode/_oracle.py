"""Random decode problems and an independent fp64 oracle for decode_attention.

The oracle gathers each request's keys token by token through the block table (or the
contiguous cache), writes the new k/v by hand, and builds the visibility of every
(query, key) pair in Python loops; it shares no code with posattn's reference backend.
"""
from __future__ import annotations

import math
import random

import torch

from posattn.kernels.reference import rope as ref_rope


def pack_bits(rows: list[list[bool]], width_words: int) -> torch.Tensor:
    """int32 [len(rows), width_words]: bit j of row i set when rows[i][j]."""
    out = torch.zeros(len(rows), width_words, dtype=torch.int64)
    for i, r in enumerate(rows):
        for j, ok in enumerate(r):
            if ok:
                out[i, j // 32] |= 1 << (j % 32)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)
    return out.to(torch.int32)


def random_tree(n: int, rng: random.Random) -> list[list[bool]]:
    """Visibility rows of a random tree of n nodes (self and all ancestors)."""
    parents = [-1] + [rng.randrange(0, i) for i in range(1, n)]
    rows = []
    for i in range(n):
        r = [False] * n
        a = i
        while a >= 0:
            r[a] = True
            a = parents[a]
        rows.append(r)
    return rows


class Case:
    """One random problem. Attributes are what decode_attention takes (kwargs in .kwargs)."""

    def __init__(self, q_lens, cached, HQ=4, HK=2, D=16, page_size=None, dtype=torch.float32, tree=False,
                 append=False, rope=None, window=None, causal=True, padded=False, shared=False, seed=0,
                 extra_pages=3, device="cpu", indexed="", budget=None):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        B = len(q_lens)
        self.B, self.q_lens, self.cached, self.HQ, self.HK, self.D = B, list(q_lens), list(cached), HQ, HK, D
        self.dtype, self.page_size, self.padded, self.causal, self.window = dtype, page_size, padded, causal, window
        T = sum(q_lens)
        need = [c + n for c, n in zip(cached, q_lens)]
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)   # noqa: E731
        if page_size is None:
            S = max(need) + rng.randrange(0, 3)
            self.k_cache, self.v_cache = rnd(B, S, HK, D), rnd(B, S, HK, D)
            self.block_table = None
            self.capacity = S
        else:
            per = [max(1, -(-x // page_size)) for x in need]
            mb = max(per) + rng.randrange(0, 2)
            nb = sum(per) + extra_pages
            ids = list(range(nb))
            rng.shuffle(ids)
            table = torch.zeros(B, mb, dtype=torch.int32)
            it = iter(ids)
            for b in range(B):
                for c in range(mb):
                    table[b, c] = next(it) if c < per[b] else rng.randrange(0, nb)   # unused columns: anything
            if shared and B > 1:   # request 1 reads request 0's full cached pages (a shared prefix)
                n_sh = min(cached[0], cached[1]) // page_size
                table[1, :n_sh] = table[0, :n_sh]
            self.k_cache, self.v_cache = rnd(nb, page_size, HK, D), rnd(nb, page_size, HK, D)
            self.block_table = table
            self.capacity = mb * page_size
        self.cache_seqlens = torch.tensor(cached, dtype=torch.int32)
        self.cu = torch.tensor([0] + list(itertools_accumulate(q_lens)), dtype=torch.int32)
        self.q = rnd(T, HQ, D)
        self.k = rnd(T, HK, D) if append else None
        self.v = rnd(T, HK, D) if append else None
        self.rope, self.positions = rope, None
        self.tree_rows = None
        if tree:
            tmax = max(q_lens) if q_lens else 1
            W = max(1, -(-tmax // 32)) + rng.randrange(0, 2)
            rows = []
            for n in q_lens:
                rows += random_tree(n, rng)
            self.tree_rows = rows
            self.tree_mask = pack_bits(rows, W)
        else:
            self.tree_mask = None
        self.kv_indices, self.lists = None, None
        if indexed:   # per-head lists of cached slots: random subsets in random order, -1 padding spread in
            H = HK if indexed == "kv" else HQ
            budget = budget if budget is not None else max(1, max(cached) // 2 + 1)
            idx = torch.full((B, H, budget), -1, dtype=torch.int32)
            self.lists = [[set() for _ in range(H)] for _ in range(B)]
            for b in range(B):
                for h in range(H):
                    take = rng.randint(0, min(budget, cached[b]))
                    chosen = rng.sample(range(cached[b]), take)
                    slots = rng.sample(range(budget), take)
                    for sl, j in zip(slots, chosen):
                        idx[b, h, sl] = j
                    self.lists[b][h] = set(chosen)
            self.kv_indices = idx
            self.indexed = indexed
        if rope is not None and rng.random() < 0.5:   # explicit positions (a tree's depths, say)
            self.positions = torch.tensor([cached[b] + rng.randrange(0, n) for b, n in enumerate(q_lens)
                                           for _ in range(n)], dtype=torch.int64)
        if device != "cpu":
            for name in ("k_cache", "v_cache", "block_table", "cache_seqlens", "cu", "q", "k", "v", "tree_mask",
                         "positions", "kv_indices"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.to(device))

    def _shape(self, x):
        if x is None or not self.padded:
            return x
        return x.reshape(self.B, self.q_lens[0], *x.shape[1:])

    def args(self):
        """(positional args, kwargs) of decode_attention on fresh copies of the caches."""
        kc, vc = self.k_cache.clone(), self.v_cache.clone()
        kw = dict(block_table=self.block_table, k=self._shape(self.k), v=self._shape(self.v), rope=self.rope,
                  positions=self._shape(self.positions), tree_mask=self.tree_mask, causal=self.causal,
                  window=self.window)
        if self.kv_indices is not None:
            kw["kv_indices"] = self.kv_indices
        if not self.padded:
            kw["cu_seqlens_q"] = self.cu
        return (self._shape(self.q), kc, vc, self.cache_seqlens), kw

    # ------------------------------------------------------------------ the oracle
    def oracle(self):
        """fp64 (out [T, Hq, D], lse [T, Hq]), and the caches after the append."""
        kc, vc = self.k_cache.clone().cpu(), self.v_cache.clone().cpu()
        q, k = self.q.cpu(), (self.k.cpu() if self.k is not None else None)
        pos = self.positions.cpu() if self.positions is not None else None
        ps = self.page_size
        bt = self.block_table.cpu() if self.block_table is not None else None

        def where(b, j):
            if bt is None:
                return b, j
            return int(bt[b, j // ps]), j % ps

        if self.rope is not None:
            if pos is None:
                pos = torch.tensor([self.cached[b] + i for b, n in enumerate(self.q_lens) for i in range(n)])
            tables = self.rope.tables("cpu", None)
            ang = ref_rope.rope_angles(pos.reshape(1, 1, -1), tables, True)
            q = ref_rope.rotate(q[None], ang, self.rope.rotary_dim, self.rope.interleaved,
                                tables.attention_scaling)[0].to(self.dtype)
            if k is not None:
                k = ref_rope.rotate(k[None], ang, self.rope.rotary_dim, self.rope.interleaved,
                                    tables.attention_scaling)[0].to(self.dtype)
        t = 0
        for b, n in enumerate(self.q_lens):
            for i in range(n):
                if k is not None:
                    pg, off = where(b, self.cached[b] + i)
                    kc[pg, off] = k[t + i]
                    vc[pg, off] = self.v.cpu()[t + i]
            t += n
        T = sum(self.q_lens)
        G = self.HQ // self.HK
        scale = self.D ** -0.5
        out = torch.zeros(T, self.HQ, self.D, dtype=torch.float64)
        lse = torch.full((T, self.HQ), -math.inf, dtype=torch.float64)
        t = 0
        for b, n in enumerate(self.q_lens):
            L = self.cached[b]
            for i in range(n):
                keys = []
                for j in range(L + n):
                    if j >= L:
                        jj = j - L
                        if self.tree_rows is not None:
                            if not self.tree_rows[t + i][jj]:
                                continue
                        elif self.causal and jj > i:
                            continue
                    if self.window is not None and abs(L + i - j) >= self.window:
                        continue
                    keys.append(j)
                for h in range(self.HQ):
                    hk = h // G
                    hkeys = keys
                    if self.lists is not None:
                        allowed = self.lists[b][hk if self.indexed == "kv" else h]
                        hkeys = [j for j in keys if j >= L or j in allowed]
                    if not hkeys:
                        continue
                    K = torch.stack([kc[where(b, j)][hk] for j in hkeys]).double()
                    V = torch.stack([vc[where(b, j)][hk] for j in hkeys]).double()
                    s = (K @ q[t + i, h].double()) * scale
                    m = s.max()
                    p = torch.exp(s - m)
                    out[t + i, h] = (p / p.sum()) @ V
                    lse[t + i, h] = m + torch.log(p.sum())
            t += n
        return out, lse, kc, vc


def itertools_accumulate(xs):
    s = 0
    for x in xs:
        s += x
        yield s

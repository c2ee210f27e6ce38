"""posattn.select.A2ATS: windowed-rotary retrieval with query-aware VQ as a sparse-decode policy.

A2ATS (Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware
Vector Quantization): a key further than ``window`` tokens is scored as ReRoPE(window)'s far pair,
(q rotated at window) . (k unrotated), with k replaced by its code's centroid; the last ``window``
tokens are scored exactly; the ``budget`` best per KV group (the group's scores summed) or per
query head are attended (decode engine,
``kv_indices``).

Per layer, the policy keeps a codebook and a codes cache [B, capacity, Hk] (int16). In
apply_sparse_decode the caches hold post-RoPE keys, so the policy rotates them back (slot s at
position s, as transformers' cache without padding) before fitting and assigning; the far query
is likewise rotated back from position L and forward to ``window`` (vq.far_queries). The window is
scored on the stored (rotated) keys as they are.

Fit: at a layer's first decode step of a sequence, from its keys so far and the window-rotated
queries of its prefill (apply_sparse_decode hands them over through ``observe_prefill``; without
them, e.g. when ``select`` is called directly, the fit is plain k-means and ``query_aware[layer]``
says so). Codes: each step assigns the slots cached since the previous step (a few tokens).
"""
from __future__ import annotations

import torch

from posattn.select.policies import _budget
from posattn.select.topk import topk


class _Layer:
    def __init__(self):
        self.codebook = None
        self.codes = None        # [B, capacity, Hk] codebook.code_dtype
        self.coded = 0           # slots 0 .. coded-1 hold codes
        self.queries = None      # [Tq, Hq, D] window-rotated prefill queries


class A2ATS:
    """A2ATS policy: ``budget`` tokens per KV group (or query head) chosen by windowed-rotary scores with
    query-aware VQ (``n_codes`` centroids per KV head) beyond the last ``window`` tokens.

    Args:
        budget: tokens per KV head (``reduce="kv_group"``: the group's scores summed, one list per
            KV head, the default) or per query head (``reduce="none"``), <= 8192;
            n_codes: codes per KV head; window: >= 1.
        rope: the model's RopeSpec; default: built from the model's config at the first prefill
            (transformers), required when ``select`` is called directly.
        iters, seed: the codebook fit's Lloyd iterations and seed. max_fit_queries: queries kept
            per layer from the prefill (evenly spaced) for the metric.
    """

    def __init__(self, budget: int, n_codes: int, window: int, *, rope=None, reduce: str = "kv_group",
                 iters: int = 10, seed: int = 0, max_fit_queries: int = 4096):
        _budget(budget, 0, 0)
        if isinstance(n_codes, bool) or not isinstance(n_codes, int) or n_codes < 1:
            raise ValueError(f"n_codes must be a positive int (codes per KV head); got {n_codes!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (tokens scored exactly); got {window!r}")
        if reduce not in ("none", "kv_group"):
            raise ValueError(f'reduce must be "none" (per query head) or "kv_group" (per GQA group); '
                             f'got {reduce!r}')
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be a non-negative int; got {iters!r}")
        if rope is not None:
            from posattn.rope.spec import RopeSpec

            if not isinstance(rope, RopeSpec):
                raise TypeError(f"rope must be a posattn.RopeSpec or None; got {type(rope).__name__}")
        self.budget, self.n_codes, self.window = budget, n_codes, window
        self.rope, self.reduce, self.iters, self.seed = rope, reduce, iters, seed
        self.max_fit_queries = max_fit_queries
        self.layers: dict[int, _Layer] = {}

    def reset(self) -> None:
        self.layers.clear()

    @property
    def query_aware(self) -> dict[int, bool]:
        """Per layer: whether its codebook was fitted with prefill queries (else plain k-means)."""
        return {i: st.codebook.query_aware for i, st in self.layers.items() if st.codebook is not None}

    # -- the rotations back to pre-RoPE ----------------------------------------------------------
    def _unrotate_keys(self, k, positions):
        """k [B, n, Hk, D] post-RoPE at positions [n] -> fp32 pre-RoPE keys."""
        from posattn.kernels.reference.select_scores import rotate_table
        from posattn.rope.table import cos_sin_table

        t = self.rope.tables(k.device)
        R = self.rope.rotary_dim if self.rope.rotary_dim is not None else k.shape[-1]
        tab = cos_sin_table(positions.to(torch.int64), t.inv_freq.to(torch.float32).contiguous(), 1.0)
        x = rotate_table(k.to(torch.float32), tab[0][None, :, None, :], -tab[1][None, :, None, :], R,
                         bool(self.rope.interleaved))
        a = float(t.attention_scaling)
        return torch.cat((x[..., :R] / a, x[..., R:]), dim=-1) if a != 1.0 else x

    def _rope_for(self, config, D):
        if self.rope is None and config is not None:
            from posattn.rope.hf import from_hf_config

            self.rope = from_hf_config(config)
        if self.rope is None:
            raise ValueError("A2ATS needs the model's rotary spec: pass rope= (a posattn.RopeSpec) when calling "
                             "select directly")
        if self.rope.head_dim != D:
            raise ValueError(f"A2ATS: rope.head_dim ({self.rope.head_dim}) must equal the keys' head_dim ({D})")

    # -- the hook apply_sparse_decode calls on prefill ---------------------------------------------
    def observe_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor, config=None) -> None:
        """query [B, Hq, T, D] post-RoPE at positions S-T .. S-1 of key [B, Hk, S, D]: keeps a sample
        of its window-rotated (pre-RoPE) queries for the layer's fit (at most max_fit_queries, evenly
        spaced); S == T starts a new sequence, a later chunk adds to the sample."""
        from posattn.vq.ops import far_queries

        B, HQ, T, D = query.shape
        self._rope_for(config, D)
        S = key.shape[2]
        st = self.layers.get(layer)
        if st is None or S == T:                       # a new sequence (a chunked prefill continues one)
            st = self.layers[layer] = _Layer()
        q = query.transpose(1, 2).reshape(B * T, HQ, D)
        pos = (torch.arange(T, device=query.device) + (S - T)).repeat(B)
        qf = far_queries(q, self.rope, self.window, inverse_positions=pos)
        if st.queries is not None and st.queries.shape[1:] == qf.shape[1:]:
            qf = torch.cat((st.queries, qf))
        if qf.shape[0] > self.max_fit_queries:         # evenly spaced: deterministic
            pick = torch.linspace(0, qf.shape[0] - 1, self.max_fit_queries, device=qf.device).round().long()
            qf = qf[pick]
        st.queries = qf

    # -- one decode step ----------------------------------------------------------------------
    def select(self, layer: int, q, k_cache, cache_seqlens, scale):
        from posattn.vq.codebook import fit
        from posattn.vq.ops import assign, far_queries, windowed

        B, S, HK, D = k_cache.shape
        self._rope_for(None, D)
        st = self.layers.setdefault(layer, _Layer())
        if st.codebook is not None and (st.codes.shape[0] != B or S < st.coded):
            st.codebook, st.coded = None, 0                   # another sequence: refit
        if st.codebook is None:
            keys = self._unrotate_keys(k_cache, torch.arange(S, device=k_cache.device))     # [B, S, Hk, D]
            st.codebook = fit(keys.reshape(B * S, HK, D), st.queries, self.n_codes, iters=self.iters,
                              seed=self.seed)
            st.codes = torch.empty(B, max(16, 1 << (S - 1).bit_length()), HK, dtype=st.codebook.code_dtype,
                                   device=k_cache.device)
            st.codes[:, :S] = assign(keys.reshape(B * S, HK, D), st.codebook).view(B, S, HK)
            st.coded = S
        elif S > st.coded:                                     # the tokens cached since the last step
            if S > st.codes.shape[1]:
                grown = torch.empty(B, 1 << (S - 1).bit_length(), HK, dtype=st.codes.dtype, device=st.codes.device)
                grown[:, :st.coded] = st.codes[:, :st.coded]
                st.codes = grown
            new = self._unrotate_keys(k_cache[:, st.coded:S], torch.arange(st.coded, S, device=k_cache.device))
            st.codes[:, st.coded:S] = assign(new.reshape(-1, HK, D), st.codebook).view(B, S - st.coded, HK)
            st.coded = S
        qf = far_queries(q, self.rope, self.window, inverse_positions=cache_seqlens)
        codes = st.codes[:, :S]
        bt = torch.arange(B, dtype=torch.int32, device=q.device)[:, None]
        s = windowed(q, qf, st.codebook, codes, k_cache, bt, cache_seqlens, self.window, float(scale), None, None,
                     self.reduce)
        return topk(s, self.budget, lengths=cache_seqlens)                      # [B, Hk | Hq, budget]

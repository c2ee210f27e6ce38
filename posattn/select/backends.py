"""posattn.select's kernel registrations: one line per backend, plus their supports rules.

topk kernel contract (every backend): ``fn(scores [R, N] fp32 (fp64: reference only), lengths int32
[R], k, sinks, window, config)`` -> int32 [R, k], see posattn/kernels/reference/select.py.
"""
from __future__ import annotations

from posattn import _supports as S
from posattn import dispatch


def _topk_reference(scores, lengths, k, sinks, window, config):
    from posattn.kernels.reference import select as ref

    return ref.topk(scores, lengths, k, sinks, window)


def _topk_cpu(scores, lengths, k, sinks, window, config):
    from posattn.kernels import cpu_select

    return cpu_select.topk(scores, lengths, k, sinks, window, config)


def _topk_triton(scores, lengths, k, sinks, window, config):
    from posattn.kernels.triton import select_topk

    return select_topk.topk(scores, lengths, k, sinks, window, config)


_cpu_supports = S.cpu(("float32",), "the C++ kernel reads fp32 scores (float64 runs on the reference)")
_triton_supports = S.triton(("float32",), "the Triton kernel reads fp32 scores (float64 runs on the reference)")
_triton_default = S.lazy("posattn.kernels.triton.select_topk", "default_config")
_triton_space = S.lazy("posattn.kernels.triton.select_topk", "search_space")


dispatch.register("topk", "reference", dtypes=("float32", "float64"))(_topk_reference)
dispatch.register("topk", "cpu", supports=_cpu_supports, dtypes=("float32",),
                  default_config=lambda key: {"threads": 0},
                  search_space=lambda key: [{"threads": t} for t in (0, 1)])(_topk_cpu)
dispatch.register("topk", "triton", supports=_triton_supports, dtypes=("float32",), default_config=_triton_default,
                  search_space=_triton_space)(_topk_triton)


# ---- scores: fn(q [B, Hq, D] rotated, fp32 (fp64 on the reference), k_cache, block_table, cache_seqlens,
# scale, ktab, rotary_dim, interleaved, config, vote=False, far=None) -> fp32 [B, Hq, S_max], or [B, 1, S_max]
# TokenSelect votes with vote=True; far: a position map's far products (posattn/kernels/reference/select_scores.py)

def _scores_reference(q, k_cache, bt, cs, scale, ktab, R, inter, config, vote=False, far=None):
    from posattn.kernels.reference import select_scores as ref

    return ref.scores(q, k_cache, bt, cs, scale, ktab, R, inter, vote, far)


def _scores_cpu(q, k_cache, bt, cs, scale, ktab, R, inter, config, vote=False, far=None):
    from posattn.kernels import cpu_select

    return cpu_select.scores(q, k_cache, bt, cs, scale, ktab, R, inter, config, vote, far)


def _scores_triton(q, k_cache, bt, cs, scale, ktab, R, inter, config, vote=False, far=None):
    from posattn.kernels.triton import select_scores

    return select_scores.scores(q, k_cache, bt, cs, scale, ktab, R, inter, config, vote, far)


_scores_cpu_supports = S.cpu(S.NATIVE, "the C++ kernel computes in fp32 (float64 runs on the reference)")
_scores_triton_supports = S.triton(S.NATIVE, "not compiled for Triton (float16, bfloat16, float32)")
_scores_triton_default = S.lazy("posattn.kernels.triton.select_scores", "default_config")
_scores_triton_space = S.lazy("posattn.kernels.triton.select_scores", "search_space")


dispatch.register("scores", "reference", dtypes=("float32", "float16", "bfloat16", "float64"))(_scores_reference)
dispatch.register("scores", "cpu", supports=_scores_cpu_supports, default_config=lambda key: {"threads": 0,
                  "block_s": 64}, search_space=lambda key: [{"threads": t, "block_s": b} for t in (0, 1)
                                                             for b in (16, 64, 256)])(_scores_cpu)
dispatch.register("scores", "triton", supports=_scores_triton_supports, default_config=_scores_triton_default,
                  search_space=_scores_triton_space)(_scores_triton)


# ---- page_scores: fn(q [B, Hq, D] fp32 (fp64 on the reference), kmin, kmax [NP, Hk, D], page_ids int32
# [B, MP], cache_seqlens, page_size, config) -> fp32 [B, Hq, MP] (posattn/kernels/reference/select_pages.py)

def _pages_reference(q, kmin, kmax, ids, cs, ps, config):
    from posattn.kernels.reference import select_pages as ref

    return ref.page_scores(q, kmin, kmax, ids, cs, ps)


def _pages_cpu(q, kmin, kmax, ids, cs, ps, config):
    from posattn.kernels import cpu_select

    return cpu_select.page_scores(q, kmin, kmax, ids, cs, ps, config)


def _pages_triton(q, kmin, kmax, ids, cs, ps, config):
    from posattn.kernels.triton import select_pages

    return select_pages.page_scores(q, kmin, kmax, ids, cs, ps, config)


_pages_triton_default = S.lazy("posattn.kernels.triton.select_pages", "default_config")
_pages_triton_space = S.lazy("posattn.kernels.triton.select_pages", "search_space")


dispatch.register("page_scores", "reference",
                  dtypes=("float32", "float16", "bfloat16", "float64"))(_pages_reference)
dispatch.register("page_scores", "cpu", supports=_scores_cpu_supports, default_config=lambda key: {"threads": 0},
                  search_space=lambda key: [{"threads": t} for t in (0, 1)])(_pages_cpu)
dispatch.register("page_scores", "triton", supports=_scores_triton_supports, default_config=_pages_triton_default,
                  search_space=_pages_triton_space)(_pages_triton)

"""posattn.vq's kernel registrations: one line per backend, plus their supports rules.

vq_assign: ``fn(keys [T, Hk, D], metric_centroids, centroid_norms, code_dtype, config)`` -> codes [T, Hk];
vq_code_scores: ``fn(qf [B, Hq, D] fp32 (fp64: reference), centroids, codes, block_table, far_len, scale,
out, config)`` fills out. Contracts: posattn/kernels/reference/vq.py.
"""
from __future__ import annotations

from posattn import _supports as S
from posattn import dispatch


def _assign_reference(keys, mc, cn, code_dtype, config):
    from posattn.kernels.reference import vq as ref

    return ref.assign(keys, mc, cn, code_dtype)


def _assign_cpu(keys, mc, cn, code_dtype, config):
    from posattn.kernels import cpu_vq

    return cpu_vq.assign(keys, mc, cn, code_dtype, config)


def _assign_triton(keys, mc, cn, code_dtype, config):
    from posattn.kernels.triton import vq

    return vq.assign(keys, mc, cn, code_dtype, config)


def _scores_reference(qf, cent, codes, bt, far_len, scale, out, config):
    from posattn.kernels.reference import vq as ref

    return ref.code_scores(qf, cent, codes, bt, far_len, scale, out)


def _scores_cpu(qf, cent, codes, bt, far_len, scale, out, config):
    from posattn.kernels import cpu_vq

    return cpu_vq.code_scores(qf, cent, codes, bt, far_len, scale, out, config)


def _scores_triton(qf, cent, codes, bt, far_len, scale, out, config):
    from posattn.kernels.triton import vq

    return vq.code_scores(qf, cent, codes, bt, far_len, scale, out, config)


_cpu_ok = S.cpu(S.NATIVE, "the C++ kernel computes in fp32 (float64 runs on the reference)")
_triton_ok = S.triton(S.NATIVE, "the Triton kernel computes in fp32 (float64 runs on the reference)")
_ALL = ("float32", "float16", "bfloat16", "float64")

dispatch.register("vq_assign", "reference", dtypes=_ALL)(_assign_reference)
dispatch.register("vq_assign", "cpu", supports=_cpu_ok, default_config=lambda key: {"threads": 0},
                  search_space=lambda key: [{"threads": t} for t in (0, 1)])(_assign_cpu)
dispatch.register("vq_assign", "triton", supports=_triton_ok,
                  default_config=lambda key: {"block_t": 32, "block_c": 32, "num_warps": 4},
                  search_space=lambda key: [{"block_t": t, "block_c": c, "num_warps": w} for t in (32, 64)
                                            for c in (32, 64) for w in (4, 8)])(_assign_triton)

dispatch.register("vq_code_scores", "reference", dtypes=_ALL)(_scores_reference)
dispatch.register("vq_code_scores", "cpu", supports=_cpu_ok,
                  default_config=lambda key: {"threads": 0, "block_s": 256},
                  search_space=lambda key: [{"threads": t, "block_s": b} for t in (0, 1)
                                            for b in (64, 256, 1024)])(_scores_cpu)
dispatch.register("vq_code_scores", "triton", supports=_triton_ok,
                  default_config=S.lazy("posattn.kernels.triton.vq", "default_config"),
                  search_space=S.lazy("posattn.kernels.triton.vq", "search_space"))(_scores_triton)

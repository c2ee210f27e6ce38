"""Query-aware vector quantization of pre-RoPE keys for A2ATS retrieval (issue 14).

fit -> Codebook (one per KV head, k-means under the queries' second-moment metric); assign -> codes;
scores -> far tokens by centroid lookup, the last ``window`` tokens exactly. The policy for
apply_sparse_decode is posattn.select.A2ATS (posattn/vq/policy.py).
"""
from posattn.vq.codebook import Codebook, fit
from posattn.vq.ops import VqAssignKey, VqScoresKey, assign, code_scores, far_queries, scores
from posattn.vq import backends as _backends  # noqa: F401  registers the kernels

__all__ = ["Codebook", "VqAssignKey", "VqScoresKey", "assign", "code_scores", "far_queries", "fit", "scores"]

"""fp64 reference of posattn.vq's two kernels (the lowered problems every backend shares).

assign: ``assign(keys [T, Hk, D], metric_centroids [Hk, C, D] fp32, centroid_norms [Hk, C] fp32,
code_dtype)`` -> codes [T, Hk] of ``code_dtype`` (int16 / int32):

    codes[t, h] = argmin_c  centroid_norms[h, c] - 2 * keys[t, h] . metric_centroids[h, c]

i.e. the centroid nearest to the key under the codebook's metric, (k - c)^T M (k - c) minus the
constant k^T M k; ties go to the lower code.

code_scores: ``code_scores(qf [B, Hq, D] (fp32; fp64 here), centroids [Hk, C, D] fp32, codes
[num_blocks, page_size, Hk] int16/int32, block_table int32 [B, max_blocks], far_len int32 [B],
scale, out fp32 [B, Hq, S_max] (a view; last dim contiguous))`` fills ``out``:

    out[b, h, s] = scale * qf[b, h] . centroids[h // G, clamp(code(b, s, h // G), 0, C - 1)]   s < far_len[b]
                 = -inf                                                                         otherwise

with the code of logical slot s read from page ``block_table[b, s // page_size]``, row
``s % page_size`` (as the keys are, posattn/kernels/reference/select_scores.py), S_max =
max_blocks * page_size. A kernel builds the C-entry table qf[b, h] . centroids[h // G] once per
query head and gathers it by code: the far tokens cost one code read each. Codes outside [0, C)
are clamped (memory safety; the ops never write such codes).
"""
from __future__ import annotations

import torch

from posattn.kernels.reference.select_scores import gather_keys


def assign(keys, metric_centroids, centroid_norms, code_dtype):
    k = keys.to(torch.float64)
    d = centroid_norms.to(torch.float64)[None] - 2.0 * torch.einsum("thd,hcd->thc", k,
                                                                     metric_centroids.to(torch.float64))
    return d.argmin(-1).to(code_dtype)            # argmin returns the first minimum: ties to the lower code


def code_scores(qf, centroids, codes, block_table, far_len, scale: float, out):
    B, HQ, D = qf.shape
    HK, C, _ = centroids.shape
    G = HQ // HK
    table = torch.einsum("bhd,hcd->bhc", qf.to(torch.float64),
                         centroids.to(torch.float64).repeat_interleave(G, dim=0)) * scale      # [B, Hq, C]
    code = gather_keys(codes[..., None], block_table)[..., 0].to(torch.int64).clamp(0, C - 1)  # [B, S, Hk]
    S = code.shape[1]
    idx = code.repeat_interleave(G, dim=2).transpose(1, 2)                                     # [B, Hq, S]
    s = torch.gather(table, 2, idx)
    L = far_len.to(torch.int64).clamp(0, S)[:, None, None]
    valid = torch.arange(S, device=qf.device)[None, None, :] < L
    out.copy_(torch.where(valid, s, torch.full_like(s, -float("inf"))))
    return out

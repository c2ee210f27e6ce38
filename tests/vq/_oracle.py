"""fp64 oracles for posattn.vq, built from the definitions (not from the kernels' contracts):
each pair's rotation explicitly (ReRoPE(window): near pairs at (L, s), far pairs at (window, 0) with
the key replaced by its code's centroid), and the metric distance of a key to every centroid."""
import torch

from posattn.position_maps import ReRoPE, pair_positions


def rotate(x, pos, spec):
    """x [..., D] rotated at fp64 positions pos [...] (broadcast over D), with the spec's inv_freq."""
    t = spec.tables(torch.device("cpu"))
    inv = t.inv_freq.to(torch.float64)
    a = float(t.attention_scaling)
    R = spec.rotary_dim or x.shape[-1]
    ang = pos.to(torch.float64)[..., None] * inv
    c, s = torch.cos(ang) * a, torch.sin(ang) * a
    x = x.to(torch.float64)
    rot, rest = x[..., :R], x[..., R:]
    if spec.interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    else:
        x1, x2 = rot[..., :R // 2], rot[..., R // 2:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    return torch.cat((out, rest), -1)


def windowed_scores(q, keys, codes, centroids, L, window, spec, scale):
    """q [B, Hq, D] pre-RoPE, keys [B, S, Hk, D] pre-RoPE (logical slots), codes [B, S, Hk],
    centroids [Hk, C, D], L [B] -> fp64 [B, Hq, S]: ReRoPE(window) with far keys quantized, the
    pair at distance exactly `window` counted near (both rotations agree there)."""
    B, HQ, D = q.shape
    S, HK = keys.shape[1], keys.shape[2]
    G = HQ // HK
    out = torch.full((B, HQ, S), -float("inf"), dtype=torch.float64)
    m = ReRoPE(window + 1)     # far when d >= window + 1, i.e. d > window: the last `window` slots are near
    for b in range(B):
        Lb = int(min(L[b], S))
        if Lb == 0:
            continue
        a, bpos = pair_positions(m, torch.tensor([Lb]), torch.arange(Lb))           # [1, Lb] each
        far = (Lb - torch.arange(Lb)) > window
        for h in range(HQ):
            k = keys[b, :Lb, h // G].to(torch.float64)
            cen = centroids[h // G].to(torch.float64)[codes[b, :Lb, h // G].long()]
            kk = torch.where(far[:, None], cen, k)
            qa = torch.where(far[:, None], rotate(q[b, h], torch.tensor(float(window)), spec).expand(Lb, D),
                             rotate(q[b, h].expand(Lb, D), a[0], spec))
            kb = rotate(kk, torch.where(far, torch.zeros(Lb, dtype=torch.float64), bpos[0]), spec)
            out[b, h, :Lb] = (qa * kb).sum(-1) * scale
    return out


def metric_dist(keys, codebook, M):
    """[T, Hk, C] fp64: (k - c)^T M (k - c) under the fp64 metric M [Hk, D, D]."""
    diff = keys.to(torch.float64)[:, :, None, :] - codebook.centroids.to(torch.float64)[None]
    return torch.einsum("thcd,hde,thce->thc", diff, M, diff)

"""An independent top-k oracle: plain Python per row (a full sort by (forced, -score, index))."""
import math


def topk_rows(scores, lengths, k, sinks=0, window=0, ordered=False):
    """scores: list of rows (lists of floats); lengths: list of ints -> list of k-lists of ints."""
    out = []
    for row, L in zip(scores, lengths):
        L = max(0, min(int(L), len(row)))

        def rank(j):
            x = float(row[j])
            v = -math.inf if math.isnan(x) else x
            forced = j < sinks or j >= L - window
            return (0 if forced else 1, 1 if math.isnan(x) else 0, -v, j)

        chosen = sorted(range(L), key=rank)[:min(k, L)]
        if ordered:
            def by_score(j):
                x = float(row[j])
                return (1 if math.isnan(x) else 0, 0.0 if math.isnan(x) else -x, j)
            chosen = sorted(chosen, key=by_score)
        else:
            chosen = sorted(chosen)
        out.append(chosen + [-1] * (k - len(chosen)))
    return out


def scores_oracle(q, k_cache, cache_seqlens, block_table=None, scale=None, rope=None, positions=None,
                  key_positions=None, position_map=None):
    """fp64 (want [B, Hq, S_max], magnitude [B, Hq, S_max]) by plain loops over slots: keys read
    page by page, rotated with fp64 angles position * inv_freq (exact enough for test positions).
    With a position map each pair's two rotation positions come from posattn.position_maps'
    pair_positions (VistaRoPE: the query's flag is visual[b, cache_seqlens[b]], text past S_max).
    magnitude = scale * sum_d |rot q_d| (|k_d| + |k_partner(d)|), the size rounding errors scale with."""
    import torch

    B, HQ, D = q.shape
    PS, HK = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HK
    S = k_cache.shape[1] if block_table is None else block_table.shape[1] * PS
    scale = D ** -0.5 if scale is None else scale
    qd, kd = q.double().cpu(), k_cache.double().cpu()
    want = torch.full((B, HQ, S), -math.inf, dtype=torch.float64)
    mag = torch.zeros(B, HQ, S, dtype=torch.float64)
    if rope is not None:
        R = rope.rotary_dim or D
        inv = rope.tables("cpu").inv_freq.double().tolist()      # the spec's own inv_freq (fp32 values)

    def pairs(R):
        if rope.interleaved:
            return [(2 * p, 2 * p + 1, p) for p in range(R // 2)]
        return [(p, p + R // 2, p) for p in range(R // 2)]

    def rot(x, pos):
        y = x.clone()
        for i, j, p in pairs(R):
            c, s = math.cos(pos * inv[p]), math.sin(pos * inv[p])
            y[i], y[j] = x[i] * c - x[j] * s, x[j] * c + x[i] * s
        return y

    def partner(d):
        if rope is None or d >= R:
            return None
        for i, j, _ in pairs(R):
            if d in (i, j):
                return j if d == i else i

    pairs_at = {}
    if position_map is not None:
        from posattn.position_maps import VistaRoPE, pair_positions

        for b in range(B):
            qp = int(cache_seqlens[b]) if positions is None else int(positions[b])
            if isinstance(key_positions, str):
                kp_all = torch.arange(S)
            else:
                kp_all = key_positions if key_positions.dim() == 1 else key_positions[b]
            vq = vk = None
            if isinstance(position_map, VistaRoPE):
                c = int(cache_seqlens[b])
                vq = torch.tensor([bool(position_map.visual[b, c]) if c < S else False])
                vk = position_map.visual[b].cpu()
            a, bb = pair_positions(position_map, torch.tensor([qp]), kp_all.cpu().to(torch.int64), vq, vk)
            pairs_at[b] = (a[0].tolist(), bb[0].tolist())
    for b in range(B):
        L = max(0, min(int(cache_seqlens[b]), S))
        for s in range(L):
            page = b if block_table is None else int(block_table[b, s // PS])
            row = s if block_table is None else s % PS
            for hk in range(HK):
                k = kd[page, row, hk]
                if rope is not None:
                    if isinstance(key_positions, str):
                        kp = s
                    elif key_positions.dim() == 1:
                        kp = int(key_positions[s])
                    else:
                        kp = int(key_positions[b, s])
                    if b in pairs_at:
                        kp = pairs_at[b][1][s]
                    kr = rot(k, kp)
                else:
                    kr = k
                for g in range(G):
                    h = hk * G + g
                    qv = qd[b, h]
                    if rope is not None:
                        qp = int(cache_seqlens[b]) if positions is None else int(positions[b])
                        if b in pairs_at:
                            qp = pairs_at[b][0][s]
                        qv = rot(qv, qp)
                    want[b, h, s] = scale * float((qv * kr).sum())
                    m = 0.0
                    for d in range(D):
                        pd = partner(d)
                        m += abs(float(qv[d])) * (abs(float(k[d])) + (abs(float(k[pd])) if pd is not None else 0))
                    mag[b, h, s] = scale * m
    return want, mag

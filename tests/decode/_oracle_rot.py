"""An independent fp64 oracle for decode_attention over pre-RoPE caches (key_positions) and
position maps: every (query, key) pair is rotated explicitly at the two positions
posattn.position_maps.pair_positions gives it (plain RoPE: the query's and the key's own), with
angles from the fp64 reference rotation; visibility is rebuilt in Python loops as in _oracle.py.
"""
from __future__ import annotations

import math

import torch

from posattn.kernels.reference import rope as ref_rope
from posattn.position_maps import VistaRoPE, pair_positions


def _rot(x: torch.Tensor, pos: torch.Tensor, spec) -> torch.Tensor:
    """x [..., H, D] fp64 rotated at fp64 positions pos [...] (exact angles, attention_scaling)."""
    tables = spec.tables("cpu", None)
    lead = pos.shape
    ang = ref_rope.rope_angles(pos.reshape(1, 1, -1).to(torch.float64), tables, True)      # [1, 1, n, R/2]?
    ang = ang.reshape(1, -1, 1, ang.shape[-1])
    xr = ref_rope.rotate(x.reshape(1, -1, *x.shape[-2:]), ang, spec.rotary_dim or x.shape[-1], spec.interleaved,
                         tables.attention_scaling)
    return xr.reshape(*lead, *x.shape[-2:])


def key_pos_of(case, key_positions, b: int, N: int) -> torch.Tensor:
    """Request b's key positions [N] in the dtype the op reads them in (int64 for "slots")."""
    if isinstance(key_positions, str):
        return torch.arange(N, dtype=torch.int64)
    kp = key_positions.cpu()
    return (kp[b] if kp.dim() == 2 else kp)[:N]


def oracle(case, key_positions, position_map=None, round_to=None):
    """fp64 (out [T, Hq, D], lse [T, Hq]) and the caches after the (unrotated) append.

    round_to: a dtype to round each rotated q and k to before the product (what a kernel with
    qk_precision="bf16" multiplies: the same rounded rotated q/k as tests/_tol.py describes), or None."""
    spec = case.rope
    kc, vc = case.k_cache.clone().cpu(), case.v_cache.clone().cpu()
    q = case.q.cpu().double()
    ps, bt = case.page_size, (case.block_table.cpu() if case.block_table is not None else None)

    def where(b, j):
        return (b, j) if bt is None else (int(bt[b, j // ps]), j % ps)

    t = 0
    for b, n in enumerate(case.q_lens):
        for i in range(n):
            if case.k is not None:
                pg, off = where(b, case.cached[b] + i)
                kc[pg, off] = case.k.cpu()[t + i]
                vc[pg, off] = case.v.cpu()[t + i]
        t += n
    T, G, scale = sum(case.q_lens), case.HQ // case.HK, case.D ** -0.5
    out = torch.zeros(T, case.HQ, case.D, dtype=torch.float64)
    lse = torch.full((T, case.HQ), -math.inf, dtype=torch.float64)
    vis = position_map.visual.cpu() if isinstance(position_map, VistaRoPE) else None
    t = 0
    for b, n in enumerate(case.q_lens):
        L = case.cached[b]
        N = L + n
        kpos = key_pos_of(case, key_positions, b, N)
        if case.positions is not None:
            qpos = case.positions.cpu().reshape(-1)[t:t + n]
        else:
            qpos = kpos[L:L + n]
        K = torch.stack([kc[where(b, j)] for j in range(N)]).double()        # [N, Hk, D] pre-RoPE
        V = torch.stack([vc[where(b, j)] for j in range(N)]).double()
        if position_map is None:
            a = qpos.to(torch.float64)[:, None].expand(n, N)
            bb = kpos.to(torch.float64)[None, :].expand(n, N)
        else:
            vq = vis[b, L:L + n] if vis is not None else None
            vk = vis[b, :N] if vis is not None else None
            a, bb = pair_positions(position_map, qpos, kpos, vq, vk)
        for i in range(n):
            keys = []
            for j in range(N):
                if j >= L:
                    jj = j - L
                    if case.tree_rows is not None:
                        if not case.tree_rows[t + i][jj]:
                            continue
                    elif case.causal and jj > i:
                        continue
                if case.window is not None and abs(L + i - j) >= case.window:
                    continue
                keys.append(j)
            if not keys:
                continue
            idx = torch.tensor(keys)
            qi = _rot(q[t + i][None].expand(len(keys), -1, -1), a[i, idx], spec)            # [k, Hq, D]
            kj = _rot(K[idx], bb[i, idx], spec)                                              # [k, Hk, D]
            if round_to is not None:
                qi, kj = qi.to(round_to).double(), kj.to(round_to).double()
            for h in range(case.HQ):
                hk = h // G
                sel = list(range(len(keys)))
                if case.lists is not None:
                    allowed = case.lists[b][hk if case.indexed == "kv" else h]
                    sel = [x for x, j in enumerate(keys) if j >= L or j in allowed]
                if not sel:
                    continue
                sl = torch.tensor(sel)
                s = (qi[sl, h] * kj[sl, hk]).sum(-1) * scale
                m = s.max()
                p = torch.exp(s - m)
                out[t + i, h] = (p / p.sum()) @ V[idx[sl], hk]
                lse[t + i, h] = m + torch.log(p.sum())
        t += n
    return out, lse, kc, vc

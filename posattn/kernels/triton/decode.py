"""Triton decode engine: split-KV (flash-decoding) attention of new tokens over a paged cache.

One program per (query block, KV head, split). A query block is BLOCK_Q consecutive new tokens
of one request times the G = Hq / Hk query heads of the KV head (rows r -> token r // G, head
r % G, GQA packed as FlashInfer does), so every K/V tile is read once for the whole group. The
program walks its split's share of the request's logical slots [lo, hi) in BLOCK_N steps:

    page, off = block_table[b, j // PAGE], j % PAGE          (any page order, shared pages)
    s   = (q . k_j) * scale * log2(e)                         fp32 (fp32 inputs: exact products)
    s   = -inf where not visible(row, j)                      the "which keys" program, below
    m'  = max(m, rowmax s); p = exp2(s - m'); l = l exp2(m - m') + rowsum p; acc = acc exp2(m - m') + p @ v

    visible(i, j) = j < L + n and (j < L or newbit(i, j - L)) and |L + i - j| < window
    newbit = tree bit (TREE), j - L <= i (CAUSAL), or True

With one split the program stores out = acc / l and lse = (m + log2 l) ln 2; with several it
stores fp32 partials that ``_decode_merge`` combines by their LSE. Which request and token
range a program owns is derived in the kernel from cu_seqlens_q (a prefix sum of per-request
block counts), so the launch depends on shapes only: no host sync, CUDA-graph capturable.
Every pointer offset is computed in 64 bits.

Sparse decode (``kv_indices``, token selection): the walk visits the head's listed cached slots
(``IDX[b, head, p]``, -1 or out-of-range entries skipped) and then the step's new tokens; with
one list per query head a program holds one query head (ROWH = 1) instead of the GQA group.
In-kernel rotation (``rot``, posattn/decode/rotary.py; QROT/KROT/MAP): q arrives rotated in fp32
(QN, and QF at the map's far positions); each key tile is loaded as its two rotary halves and
the tail (flash_attn_tiles' layout), the halves rotated in fp32 by the call's table row of each
slot (KT [2, rows, S, R/2]: cos, sin), and both operands made by the attention engine's
``_qk_operand`` (bf16: rounded to the input dtype; bf16x3: hi + lo; fp32) and multiplied by its
``_scores``. With a map a tile first decides from its query and key positions (min/max of the
distance; VistaRoPE: the visual flags) whether it needs the near product, the far product
(keys rotated by KTF, q from QF) or both; a pair takes the far score where it is far:

    s = where(far, (q_far . k_far), (q . k)) * scale * log2(e)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# the attention engine's constants and its dot (fp32 accumulation; upcast under the interpreter)
from posattn.kernels.triton.decode_rotary import _q_halves, _rot_args, _rot_tile
from posattn.kernels.triton.flash_attn_tiles import _LN2, _LOG2E, _dot, _map_side, tile_meta


@triton.jit
def _decode_fwd(Q, K, V, BT, CS, CU, TREE, IDX, O, LSE, OP, LP, QN, QF, KT, KTF, QP, KP, VIS,
                T, B, HQ, PAGE, MAXB, WINDOW, CHUNK, BUDGET, scale, MWIN,
                s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, s_tm, s_ib, s_ih, s_ot, s_oh,
                s_nt, s_nh, s_tc, s_tb, s_tt, s_kpb, s_vis, s_fc, s_fb, s_ft,
                G: tl.constexpr, ROWH: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BLOCK_Q: tl.constexpr,
                BM: tl.constexpr, BLOCK_N: tl.constexpr, BB: tl.constexpr, TREE_MASK: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_IDX: tl.constexpr, SPLITS: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, QROT: tl.constexpr = False, KROT: tl.constexpr = False,
                MAP: tl.constexpr = 0, ROT: tl.constexpr = 16, BH: tl.constexpr = 16, R_HALF: tl.constexpr = 1,
                BTL: tl.constexpr = 16, INTERLEAVED: tl.constexpr = False, HAS_TAIL: tl.constexpr = False,
                QKP: tl.constexpr = 0, RNE: tl.constexpr = False):
    g = tl.program_id(0)
    hg = tl.program_id(1)                                # head group: ROWH query heads (G, or 1 with per-q lists)
    split = tl.program_id(2)
    hk = (hg * ROWH) // G
    # which request and which of its tokens: prefix sum of per-request block counts
    bidx = tl.arange(0, BB)
    c0 = tl.load(CU + bidx, mask=bidx < B, other=0)
    c1 = tl.load(CU + bidx + 1, mask=bidx < B, other=0)
    nblk = (c1 - c0 + BLOCK_Q - 1) // BLOCK_Q
    incl = tl.cumsum(nblk, 0)
    b = tl.sum((incl <= g).to(tl.int32), 0)
    live = b < B
    b = tl.minimum(b, B - 1)
    first = tl.sum(tl.where(bidx < b, nblk, 0), 0)
    start = (g - first) * BLOCK_Q                        # first new-token index of the block
    t0 = tl.load(CU + b)
    n = tl.load(CU + b + 1) - t0
    n = tl.where(live, n, 0)
    L = tl.load(CS + b)

    r = tl.arange(0, BM)
    qi = start + r // ROWH                               # token index within the request
    h = hg * ROWH + r % ROWH
    rvalid = (r < BLOCK_Q * ROWH) & (qi < n)
    t = (t0 + qi).to(tl.int64)
    d = tl.arange(0, BD)
    dmask = d < D
    DT = K.dtype.element_ty
    if QROT:   # rotated in fp32 by the op: the operands (rounded, split or fp32) are made here
        qa, qa_lo, qb, qb_lo, qt = _q_halves(QN, t, h, rvalid, s_nt, s_nh, ROT, BH, R_HALF, BTL, D, INTERLEAVED,
                                             DT, QKP, UPCAST, RNE)
        fa, fa_lo, fb, fb_lo, ft = qa, qa_lo, qb, qb_lo, qt
        qpos = tl.zeros([BM], tl.float64)
        vq = tl.zeros([BM], tl.int32)
        if MAP != 0:
            fa, fa_lo, fb, fb_lo, ft = _q_halves(QF, t, h, rvalid, s_nt, s_nh, ROT, BH, R_HALF, BTL, D,
                                                 INTERLEAVED, DT, QKP, UPCAST, RNE)
            # query side: fp64 position of row's token, visual flag of its own slot L + i (VistaRoPE)
            qpos, vq = _map_side(QP + t0, VIS + b.to(tl.int64) * s_vis + L, qi, rvalid, MAP)
    else:
        q = tl.load(Q + t[:, None] * s_qt + h[:, None].to(tl.int64) * s_qh + d[None, :],
                    mask=rvalid[:, None] & dmask[None, :], other=0.0)

    # the walk: positions p in [lo, hi), then this split's share. Without index lists p is the
    # logical slot; with them p < BUDGET reads slot IDX[b, hg, p] and p >= BUDGET is new token
    # p - BUDGET (slot L + p - BUDGET)
    last = tl.minimum(start + BLOCK_Q, n)                # one past the block's last token
    if HAS_IDX:
        base = BUDGET
    else:
        base = L
    if CAUSAL and not TREE_MASK:
        hi = base + last
    else:
        hi = base + n
    hi = tl.where(last > start, hi, 0)
    lo = 0
    if HAS_WINDOW and not HAS_IDX:
        lo = tl.maximum(L + start - WINDOW + 1, 0)
    lo = tl.maximum(lo, split * CHUNK)
    hi = tl.minimum(hi, (split + 1) * CHUNK)

    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    qk_scale = scale * _LOG2E
    bt_row = BT + b.to(tl.int64) * s_bt
    idx_row = IDX + b.to(tl.int64) * s_ib + hg.to(tl.int64) * s_ih
    for p0 in range(lo, hi, BLOCK_N):
        pv = p0 + tl.arange(0, BLOCK_N)
        kvalid = pv < hi
        if HAS_IDX:
            listed = pv < BUDGET
            jl = tl.load(idx_row + pv, mask=kvalid & listed, other=-1)
            j = tl.where(listed, jl, L + pv - BUDGET)
            kvalid = kvalid & (~listed | ((jl >= 0) & (jl < L)))
            j = tl.where(kvalid, j, 0)
        else:
            j = pv
        page = tl.load(bt_row + tl.minimum(j // PAGE, MAXB - 1), mask=kvalid, other=0).to(tl.int64)
        off = (j % PAGE).to(tl.int64)
        kp = K + page * s_kb + off * s_kt + hk.to(tl.int64) * s_kh
        vp = V + page * s_vb + off * s_vt + hk.to(tl.int64) * s_vh
        if QROT:
            s = _rot_tile(kp, j, kvalid, b, KT, KTF, KP, VIS, MWIN, s_tc, s_tb, s_tt, s_kpb, s_vis, s_fc, s_fb, s_ft,
                          qa, qa_lo, qb, qb_lo, qt, fa, fa_lo, fb, fb_lo, ft, qpos, vq, rvalid,
                          BM, BLOCK_N, D, KROT, MAP, ROT, BH, R_HALF, BTL, INTERLEAVED, HAS_TAIL, DT, QKP,
                          PREC, UPCAST, RNE) * qk_scale
        else:
            k = tl.load(kp[:, None] + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        jj = j - L                                       # index among the new tokens (< 0: cached)
        isnew = jj >= 0
        if TREE_MASK:
            jw = tl.maximum(jj, 0)
            word = tl.load(TREE + t[:, None] * s_tm + (jw // 32)[None, :],
                           mask=rvalid[:, None] & (isnew & kvalid)[None, :], other=0)
            newok = ((word >> (jw % 32)[None, :]) & 1) != 0
            ok = (~isnew)[None, :] | newok
        elif CAUSAL:
            ok = jj[None, :] <= qi[:, None]
        else:
            ok = tl.full([BM, BLOCK_N], 1, tl.int1)
        if HAS_WINDOW:
            dist = (L + qi)[:, None] - j[None, :]
            ok = ok & (dist < WINDOW) & (-dist < WINDOW)
        ok = ok & kvalid[None, :] & rvalid[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(vp[:, None] + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m = m_new

    has = l > 0.0
    o = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * _LN2, float("-inf"))
    if SPLITS == 1:
        tl.store(O + t[:, None] * s_ot + h[:, None].to(tl.int64) * s_oh + d[None, :], o.to(O.dtype.element_ty),
                 mask=rvalid[:, None] & dmask[None, :])
        tl.store(LSE + t * HQ + h, lse, mask=rvalid)
    else:
        row = (t * HQ + h) * SPLITS + split                 # partials [T, HQ, SPLITS, (D)]
        tl.store(OP + row[:, None] * D + d[None, :], o, mask=rvalid[:, None] & dmask[None, :])
        tl.store(LP + row, lse, mask=rvalid)


@triton.jit
def _decode_merge(OP, LP, O, LSE, HQ, s_ot, s_oh, D: tl.constexpr, BD: tl.constexpr, SPLITS: tl.constexpr,
                  BS: tl.constexpr):
    """out[t, h] = sum_s exp(lse_s - lse) o_s; lse = log sum_s exp(lse_s) over the splits."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BS)
    row = (t * HQ + h) * SPLITS
    ls = tl.load(LP + row + sp, mask=sp < SPLITS, other=float("-inf"))
    mx = tl.max(ls, 0)
    mu = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(ls - mu)
    tot = tl.sum(w, 0)
    d = tl.arange(0, BD)
    o = tl.load(OP + (row + sp)[:, None] * D + d[None, :], mask=(sp < SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
    tl.store(O + t * s_ot + h.to(tl.int64) * s_oh + d, out.to(O.dtype.element_ty), mask=d < D)
    tl.store(LSE + t * HQ + h, tl.where(tot > 0.0, mu + tl.log(tl.where(tot > 0.0, tot, 1.0)), float("-inf")))


# ---------------------------------------------------------------------------
# configs


def _interpreting() -> bool:
    from posattn.kernels import triton as tk

    return tk.interpreting()


def block_q(max_q: int, group: int, cap: int = 64) -> int:
    """New tokens per program: every token of a short request, at most ``cap`` rows (tokens x heads)."""
    bq = 1
    while bq < max_q and bq * 2 * group <= cap:
        bq *= 2
    return bq


def _smem_optin() -> int | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None)


def smem_estimate(cfg: dict, head_dim: int, dtype: str) -> int:
    """An upper bound of the forward's shared memory: K and V tiles in every pipeline stage."""
    esize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return cfg["num_stages"] * cfg["BLOCK_N"] * max(16, _pow2(head_dim)) * esize * 2


def default_config(key, smem_per_block: int | None = None) -> dict:
    """Launch config from the kernel key (shapes only); on a GPU sized to its shared memory per
    block (``smem_per_block``, default: the current device's opt-in limit; sm_86/sm_89 have 99 KB)."""
    G = key.heads_q // key.heads_k
    interp = key.device_type == "cpu"
    bn = 16 if interp else (64 if key.head_dim <= 128 else 32)
    cfg = {"BLOCK_Q": block_q(key.q_bucket, G, 16 if interp else 64), "BLOCK_N": bn, "num_splits": 0,
           "num_warps": 4, "num_stages": 1 if interp else 2}
    if key.device_type == "cuda":
        limit = smem_per_block if smem_per_block is not None else _smem_optin()
        heavy = getattr(key, "rotary", "") == "map" or (getattr(key, "rotary", "") and
                                                        getattr(key, "qk_precision", "bf16") == "bf16x3")
        if heavy and key.head_dim > 128 and limit and limit < 232448:
            # a map or the split product holds several rotated operand tiles: below Hopper's shared
            # memory, 32 rows and 32 (A100) or 16 (99 KB GPUs) keys per tile, and two stages: Triton
            # 3.7 fails to lower these variants with one (compiled for sm_80 / sm_89, head_dim 256:
            # 102 KB / 84 KB; tests/decode/test_decode_attention_aot.py)
            return dict(cfg, BLOCK_Q=block_q(key.q_bucket, G, 32), BLOCK_N=32 if limit >= 160 * 1024 else 16,
                        num_stages=2)
        while limit and smem_estimate(cfg, key.head_dim, key.dtype) > limit and (cfg["num_stages"] > 1
                                                                                or cfg["BLOCK_N"] > 16):
            if cfg["num_stages"] > 1:
                cfg["num_stages"] -= 1
            else:
                cfg["BLOCK_N"] //= 2
    return cfg


def search_space(key) -> list[dict]:
    """Tuner candidates: split count, key block, warps and stages; for several new tokens per
    request (trees, chunks) also twice the default query block (128 rows)."""
    base = default_config(key)
    G = key.heads_q // key.heads_k
    bqs = [base["BLOCK_Q"]]
    if key.q_bucket > base["BLOCK_Q"] and 2 * base["BLOCK_Q"] * G <= 128:
        bqs.append(2 * base["BLOCK_Q"])
    out = []
    for bq in bqs:
        for splits in (0, 1, 4, 16):
            for bn in (32, 64, 128):
                if key.head_dim > 128 and bn > 64:
                    continue
                for nw in (4, 8):
                    for ns in (2, 3):
                        out.append(dict(base, BLOCK_Q=bq, num_splits=splits, BLOCK_N=bn, num_warps=nw, num_stages=ns))
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def heuristic_splits(programs: int, capacity: int, device: torch.device, block_n: int) -> int:
    """Splits from shapes only: about two waves of programs over the SMs, at least 256 slots
    (and one key block) of capacity per split."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-2 * sms // max(programs, 1))
    return max(1, min(want, capacity // max(256, block_n), 64))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_forward(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                   softmax_scale, num_splits, max_q, config, kv_indices=None, rot=None):
    """The lowered problem of posattn/kernels/reference/decode.py -> (out [T, Hq, D], lse fp32 [T, Hq]);
    ``rot``: posattn/decode/rotary.py's DecodeRotary (in-kernel rotation) or None."""
    T, HQ, D = q.shape
    HK = k_cache.shape[2]
    G = HQ // HK
    B = cache_seqlens.shape[0]
    PS, MAXB = k_cache.shape[1], block_table.shape[1]
    out = torch.empty_like(q) if q.stride(-1) == 1 else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, HQ, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    interp = _interpreting()
    # rows of a program: its tokens x ROWH query heads (the GQA group; one head with per-query-head lists)
    rowh = 1 if (kv_indices is not None and kv_indices.shape[1] == HQ and G > 1) else G
    bq = min(int(config.get("BLOCK_Q", 1)), _pow2(max(1, max_q)))
    bn = int(config["BLOCK_N"])
    nqb = min(-(-T // bq) + B, T)
    budget = kv_indices.shape[2] if kv_indices is not None else 0
    cap = budget + T if kv_indices is not None else MAXB * PS      # the walk's length bound (shapes only)
    groups = HQ // rowh
    splits = num_splits or int(config.get("num_splits", 0)) or heuristic_splits(nqb * groups, cap, q.device, bn)
    splits = max(1, min(splits, -(-cap // bn)))
    chunk = -(-(-(-cap // splits)) // bn) * bn
    splits = -(-cap // chunk)                         # no split left without slots
    bm = max(16, _pow2(bq * rowh))
    bd = max(16, _pow2(D))
    if splits > 1:
        op = torch.empty(T, HQ, splits, D, dtype=torch.float32, device=q.device)
        lp = torch.empty(T, HQ, splits, dtype=torch.float32, device=q.device)
    else:
        op = lp = lse
    tm = tree_mask if tree_mask is not None else cu_seqlens_q
    upcast = interp and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    idx = kv_indices if kv_indices is not None else cu_seqlens_q
    s_ib, s_ih = (idx.stride(0), idx.stride(1)) if kv_indices is not None else (0, 0)
    rptr, rsc, rconst = _rot_args(rot, q, D, k_cache.dtype)
    rconst.setdefault("UPCAST", upcast)
    _decode_fwd[(nqb, groups, splits)](
        q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tm, idx, out, lse, op, lp, *rptr,
        T, B, HQ, PS, MAXB, window if window > 0 else 0, chunk, budget, float(softmax_scale), rsc[0],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        tm.stride(0), s_ib, s_ih, out.stride(0), out.stride(1), *rsc[1:],
        G=G, ROWH=rowh, D=D, BD=bd, BLOCK_Q=bq, BM=bm, BLOCK_N=bn, BB=max(2, _pow2(B)),
        TREE_MASK=tree_mask is not None, CAUSAL=bool(causal), HAS_WINDOW=window > 0,
        HAS_IDX=kv_indices is not None, SPLITS=splits, PREC=prec, **rconst,
        num_warps=int(config.get("num_warps", 4)), num_stages=int(config.get("num_stages", 2)))
    if splits > 1:
        _decode_merge[(T, HQ)](op, lp, out, lse, HQ, out.stride(0), out.stride(1), D=D, BD=bd, SPLITS=splits,
                               BS=max(2, _pow2(splits)), num_warps=4 if D >= 128 else 2)
    return out, lse


def aot_specializations(cases):
    """(name, fn, signature, constexprs, num_warps, num_stages) for ahead-of-time compiles.

    cases: (head_dim, dtype, G, BLOCK_Q, BLOCK_N, tree, splits[, idx[, rot]]) tuples; idx "" (no index
    lists), "kv" (one list per KV head) or "q" (one per query head); rot "" (q rotated by the op, cache
    rotated), or "<qk_precision>[+map<code>]" for a pre-RoPE cache rotated in the kernel (rotary_dim =
    head_dim), e.g. "bf16x3+map1" (ReRoPE)."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    out = []
    for case in cases:
        D, dtype, G, bq, bn, tree, splits = case[:7]
        idx = case[7] if len(case) > 7 else ""
        rot = case[8] if len(case) > 8 else ""
        dt = names[dtype]
        sig = {n: "*" + dt for n in ("Q", "K", "V", "O")}
        sig.update({"BT": "*i32", "CS": "*i32", "CU": "*i32", "TREE": "*i32", "IDX": "*i32", "LSE": "*fp32",
                    "OP": "*fp32", "LP": "*fp32"})
        sig.update({n: "*fp32" for n in ("QN", "QF", "KT", "KTF")})
        sig.update({"QP": "*fp64", "KP": "*fp64"})
        sig["VIS"] = "*u8"
        for n in ("T", "B", "HQ", "PAGE", "MAXB", "WINDOW", "CHUNK", "BUDGET", "MWIN", "s_nt", "s_nh", "s_tc", "s_tb",
                  "s_tt", "s_kpb", "s_vis", "s_fc", "s_fb", "s_ft"):
            sig[n] = "i32"
        sig["scale"] = "fp32"
        for n in ("s_qt", "s_qh", "s_kb", "s_kt", "s_kh", "s_vb", "s_vt", "s_vh", "s_bt", "s_tm", "s_ib", "s_ih",
                  "s_ot", "s_oh"):
            sig[n] = "i64" if n in ("s_kb", "s_vb") else "i32"
        rowh = 1 if idx == "q" else G
        const = dict(G=G, ROWH=rowh, D=D, BD=max(16, _pow2(D)), BLOCK_Q=bq, BM=max(16, _pow2(bq * rowh)),
                     BLOCK_N=bn, BB=64, TREE_MASK=tree, CAUSAL=True, HAS_WINDOW=False, HAS_IDX=bool(idx),
                     SPLITS=splits, PREC="ieee" if dtype == torch.float32 else "tf32", UPCAST=False, QROT=False,
                     KROT=False, MAP=0, ROT=16, BH=16, R_HALF=1, BTL=16, INTERLEAVED=False, HAS_TAIL=False, QKP=0,
                     RNE=False)
        if rot:
            qk, _, mp = rot.partition("+map")
            meta = tile_meta(D, D, False, dtype, qk)
            const.update(QROT=True, KROT=True, MAP=int(mp or 0), ROT=meta["ROT"], BH=meta["BH"],
                         R_HALF=meta["R_HALF"], BTL=meta["BT"], HAS_TAIL=meta["HAS_TAIL"], QKP=meta["QKP"])
        sig = {k: ("constexpr" if k in const else v) for k, v in
               [(a, sig.get(a, "constexpr")) for a in _decode_fwd.arg_names]}
        tag = ("_i" + idx if idx else "") + ("_r" + rot.replace("+", "") if rot else "")
        out.append((f"decode_fwd_d{D}_{dt}_g{G}_q{bq}_n{bn}_t{int(tree)}_s{splits}{tag}",
                    _decode_fwd, sig, const, 4, 2))
        if splits > 1:
            msig = {"OP": "*fp32", "LP": "*fp32", "O": "*" + dt, "LSE": "*fp32", "HQ": "i32", "s_ot": "i32",
                    "s_oh": "i32", "D": "constexpr", "BD": "constexpr", "SPLITS": "constexpr", "BS": "constexpr"}
            mconst = dict(D=D, BD=max(16, _pow2(D)), SPLITS=splits, BS=max(2, _pow2(splits)))
            out.append((f"decode_merge_d{D}_{dt}_s{splits}", _decode_merge, msig, mconst, 4, 1))
    return out

"""Top-k selection by radix select (Triton): posattn.select.topk's GPU kernel.

One program per row. Each score becomes a 32-bit order key (``key(x)``: the float's bits with the
sign folded so that unsigned order is numeric order; -0.0 as +0.0; NaN 0, below -inf; forced
entries, the row's first ``sinks`` and last ``window`` valid ones, 2^32-1, above +inf). Four
passes of 8-bit digits find the key ``T`` of the m-th largest (m = min(k, L)) by histograms over
the entries that share the digits found so far, and how many entries equal to ``T`` to take
(``need``); a last pass writes, in ascending index order, every entry with key > T and the first
``need`` entries with key == T (ties to the lower index). Five reads of the row, no sort.
Contract: posattn/kernels/reference/select.py. Keys are int64 in [0, 2^32) to keep compares signed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keys(S, row_ptr, j, L, SINKS, WINDOW):
    valid = j < L
    x = tl.load(row_ptr + j, mask=valid, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)                                          # -0.0 ties with +0.0
    u = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    key = tl.where(u >= 0x80000000, 0xFFFFFFFF - u, u | 0x80000000)
    key = tl.where(x != x, 0, key)                                            # NaN lowest
    forced = (j < SINKS) | (j >= L - WINDOW)
    key = tl.where(forced, 0xFFFFFFFF, key)
    return key, valid


@triton.jit
def _topk_kernel(S, LEN, OUT, N, K, s_row, SINKS, WINDOW, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = S + r * s_row
    L = tl.minimum(tl.maximum(tl.load(LEN + r), 0), N)
    m = tl.minimum(L, K)
    offs = tl.arange(0, BLOCK)
    for p0 in range(0, K, BLOCK):                                           # -1 past the chosen ones
        pos = p0 + offs
        tl.store(OUT + r * K + pos, tl.full([BLOCK], -1, tl.int32), mask=(pos >= m) & (pos < K))
    digits = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)
    need = m
    for pas in tl.static_range(4):
        shift = 24 - 8 * pas                                                 # (a constexpr: pas is static)
        hmask = (0xFFFFFFFF << (32 - 8 * pas)) & 0xFFFFFFFF                  # digits already fixed
        hist = tl.zeros([256], tl.int32)
        for j0 in range(0, L, BLOCK):
            j = j0 + offs
            key, valid = _keys(S, row_ptr, j, L, SINKS, WINDOW)
            match = valid & ((key & hmask) == prefix)
            d = ((key >> shift) & 255).to(tl.int32)
            hist += tl.histogram(d, 256, mask=match)
        total = tl.sum(hist, 0)
        above = total - tl.cumsum(hist, 0)                                  # matching entries with digit > d
        hit = (above < need) & (above + hist >= need)
        dsel = tl.sum(tl.where(hit, digits, 0), 0)
        need = need - tl.sum(tl.where(hit, above, 0), 0)
        prefix = prefix | (dsel.to(tl.int64) << shift)
    taken = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    for j0 in range(0, L, BLOCK):
        j = j0 + offs
        key, valid = _keys(S, row_ptr, j, L, SINKS, WINDOW)
        eq = valid & (key == prefix)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), 0)                   # 1-based among ties so far
        sel = valid & ((key > prefix) | (eq & (eq_rank <= need)))
        pos = taken + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(OUT + r * K + pos, j.to(tl.int32), mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
        eq_seen += tl.sum(eq.to(tl.int32), 0)


def default_config(key) -> dict:
    return {"block": 1024, "num_warps": 4}


def search_space(key) -> list[dict]:
    return [{"block": b, "num_warps": w} for b in (512, 1024, 2048, 4096) for w in (4, 8)]


def topk(scores: torch.Tensor, lengths: torch.Tensor, k: int, sinks: int, window: int, config: dict) -> torch.Tensor:
    """scores fp32 [R, N] (last dim contiguous), lengths int32 [R] -> int32 [R, k] (ascending, -1 pads)."""
    R, N = scores.shape
    out = torch.empty(R, k, dtype=torch.int32, device=scores.device)
    if R == 0:
        return out
    _topk_kernel[(R,)](scores, lengths, out, N, k, scores.stride(0), sinks, window,
                       BLOCK=int(config.get("block", 1024)), num_warps=int(config.get("num_warps", 4)))
    return out

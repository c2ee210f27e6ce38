"""The tiles of the flash-attention engine: loads (rotary halves from the call's cos/sin table),
the element mask, the score products; and the launch configs (tile constexprs, block sizes).

Every pointer offset is 64-bit: head offsets are ``h.to(int64) * stride`` and row offsets
``rows.to(int64) * stride``, so head-major storage past 2^31 elements (1M tokens x 32 heads
x 128) stays addressable whatever width Triton gives the stride arguments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from posattn.kernels.triton import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# kernels may only read globals that are constexpr
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST (Triton interpreter with bf16, which has no bf16
    arithmetic) multiplies the already-rounded operands in fp32 instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _pair_cols(BH: tl.constexpr, R_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    p = tl.arange(0, BH)
    if INTERLEAVED:
        ca = 2 * p
        cb = 2 * p + 1
    else:
        ca = p
        cb = p + R_HALF
    return ca, cb, p < R_HALF


@triton.jit
def _ld(ptrs, rmask, cmask, ROWB: tl.constexpr, COLB: tl.constexpr):
    """Load a 2-D tile, bounds-checking rows and/or columns only where they can be out of range
    (blocks that need no element mask lie inside the tokens: their loads carry no predicate)."""
    if ROWB:
        if COLB:
            return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if COLB:
            return tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), kept in fp32. The split's
    rounding in integer arithmetic: the Triton interpreter has no bf16 arithmetic (its casts
    truncate), and this way the hi/lo parts are the same bits on a GPU and under it."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _qk_operand(r, DT: tl.constexpr, QKP: tl.constexpr, UPCAST: tl.constexpr):
    """(x, x_lo): the product operands of a rotated fp32 tile ``r``.

    QKP 0 ("bf16"): x = r rounded to the input dtype (what apply_rope stores), x_lo unused.
    QKP 1 ("bf16x3"): x = hi = bf16(r), x_lo = lo = bf16(r - hi); |r - hi - lo| <= 2^-16 |r|.
    QKP 2 ("fp32"): x = r, x_lo unused.
    Under the interpreter (UPCAST) hi and lo are held in fp32 (exactly bf16 values)."""
    if QKP == 1:
        if UPCAST:
            hi = _bf16_rne(r)
            lo = _bf16_rne(r - hi)
        else:
            hi = r.to(tl.bfloat16)
            lo = (r - hi.to(tl.float32)).to(tl.bfloat16)
        return hi, lo
    elif QKP == 2:
        return r, r
    else:
        x = r.to(DT)
        return x, x


@triton.jit
def _load_qk_tile(X, rows, rmask, stride_t, COS, SIN,
                  BM: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, BH: tl.constexpr,
                  R_HALF: tl.constexpr, BT: tl.constexpr, INTERLEAVED: tl.constexpr,
                  ROPE: tl.constexpr, HAS_TAIL: tl.constexpr, ROWB: tl.constexpr,
                  QKP: tl.constexpr, UPCAST: tl.constexpr):
    """(a, b, tail, cos, sin, a_lo, b_lo) of a q or k tile; a/b rotated (see _qk_operand for
    their dtype and the lo parts, used only by "bf16x3"), the tail in the input dtype.

    cos/sin come from the call's fp32 table [T, R/2] (posattn.rope.table, attention_scaling
    folded in): a = x_a cos - x_b sin, b = x_b cos + x_a sin in fp32, exactly as apply_rope's
    Triton kernel computes them (and, with QKP 0, rounds them)."""
    DT = X.dtype.element_ty
    rows64 = rows[:, None].to(tl.int64)
    base = X + rows64 * stride_t
    if ROPE:
        ca, cb, pmask = _pair_cols(BH, R_HALF, INTERLEAVED)
        p = tl.arange(0, BH)
        cs_off = rows64 * R_HALF + p[None, :]
        cos = _ld(COS + cs_off, rmask, pmask, ROWB, R_HALF != BH)
        sin = _ld(SIN + cs_off, rmask, pmask, ROWB, R_HALF != BH)
        xa = _ld(base + ca[None, :], rmask, pmask, ROWB, R_HALF != BH).to(tl.float32)
        xb = _ld(base + cb[None, :], rmask, pmask, ROWB, R_HALF != BH).to(tl.float32)
        a, a_lo = _qk_operand(xa * cos - xb * sin, DT, QKP, UPCAST)
        b, b_lo = _qk_operand(xb * cos + xa * sin, DT, QKP, UPCAST)
    else:
        cos = tl.zeros([BM, BH], dtype=tl.float32)
        sin = cos
        a = tl.zeros([BM, BH], dtype=DT)
        b = a
        a_lo = a
        b_lo = a
    if HAS_TAIL:
        c = ROT + tl.arange(0, BT)
        t = _ld(base + c[None, :], rmask, c < D, ROWB, D - ROT != BT)
    else:
        t = tl.zeros([BM, BT], dtype=DT)
    return a, b, t, cos, sin, a_lo, b_lo


@triton.jit
def _allowed2(r, c, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The element mask over a 2-D grid: r, q_doc, q_row broadcast along the query axis and
    c, k_doc along the key axis (either orientation: [BM, BN] or, transposed, [BN, BM])."""
    ok = q_doc == k_doc
    if HAS_WINDOW:
        if CAUSAL:
            ok = ok & (r - c < WINDOW)
        else:
            diff = r - c
            ok = ok & (diff < WINDOW) & (diff > -WINDOW)
    anchor = (c >= q_row) & (c < q_row + NUM_ANCHORS)
    ok = ok | anchor
    if CAUSAL:
        ok = ok & (c <= r)
    return ok & (c < T)


@triton.jit
def _allowed(rows, cols, q_doc, q_row, k_doc, T, NUM_ANCHORS, WINDOW,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The element mask of one (query block, key block) tile, [BM, BN]."""
    return _allowed2(rows[:, None], cols[None, :], q_doc[:, None], q_row[:, None], k_doc[None, :], T,
                     NUM_ANCHORS, WINDOW, CAUSAL, HAS_WINDOW)


@triton.jit
def _pair_far(pq, pk, vq, vk, MAP_WIN, MAP: tl.constexpr):
    """The pairs that take a position map's far rotation (posattn.position_maps), broadcast of the
    query-side (pq fp64 positions, vq visual flags) and key-side values: VistaRoPE (MAP 4) a text
    query and a visual key, the distance maps (1-3) p_i - p_j >= window (fp64, as the spec)."""
    if MAP == 4:
        return (vq == 0) & (vk != 0)
    else:
        return (pq - pk) >= MAP_WIN


@triton.jit
def _tile_kinds(far, valid):
    """(need_near, need_far) of a tile: whether any valid pair takes the near / the far rotation.
    Exact per pair (any/all of the elementwise flags, which the tile's min/max positions bound:
    posattn.position_maps.tile_kinds), so a tile that lies on one side of the window pays once."""
    need_far = tl.max(tl.where(valid & far, 1, 0)) > 0
    need_near = tl.max(tl.where(valid & (far == 0), 1, 0)) > 0
    return need_near, need_far


@triton.jit
def _map_side(POSF, VIS, idx, imask, MAP: tl.constexpr):
    """(fp64 positions, visual flags) of the tokens ``idx`` (VIS read by VistaRoPE only)."""
    pos = tl.load(POSF + idx, mask=imask, other=0.0)
    if MAP == 4:
        vis = tl.load(VIS + idx, mask=imask, other=0).to(tl.int32)
    else:
        vis = tl.zeros(idx.shape, dtype=tl.int32)
    return pos, vis


@triton.jit
def _qk_dot(a, b, a_lo, b_lo, PREC: tl.constexpr, UPCAST: tl.constexpr, QKP: tl.constexpr):
    """a @ b^T of rotated operands (_qk_operand): "bf16x3" sums hi.hi + hi.lo + lo.hi (lo.lo,
    2^-16 relative, is dropped), "fp32" multiplies in fp32 (ieee)."""
    if QKP == 1:
        s = _dot(a, tl.trans(b_lo), PREC, UPCAST)
        s += _dot(a_lo, tl.trans(b), PREC, UPCAST)
        s += _dot(a, tl.trans(b), PREC, UPCAST)
        return s
    elif QKP == 2:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        return _dot(a, tl.trans(b), PREC, UPCAST)


@triton.jit
def _scores(qa, qb, qt, ka, kb, kt, BM: tl.constexpr, BN: tl.constexpr, ROPE: tl.constexpr,
            HAS_TAIL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
            qa_lo, qb_lo, ka_lo, kb_lo, QKP: tl.constexpr):
    s = tl.zeros([BM, BN], dtype=tl.float32)
    if ROPE:
        s += _qk_dot(qa, ka, qa_lo, ka_lo, PREC, UPCAST, QKP)
        s += _qk_dot(qb, kb, qb_lo, kb_lo, PREC, UPCAST, QKP)
    if HAS_TAIL:
        s += _dot(qt, tl.trans(kt), PREC, UPCAST)
    return s


@triton.jit
def _grad_dot(ds, x, x_lo, PREC: tl.constexpr, UPCAST: tl.constexpr, QKP: tl.constexpr):
    """ds @ x for dq_rot (x = rotated k) or dk_rot (x = rotated q); ds is rounded to the input
    dtype. "bf16x3" with bf16 inputs: ds.hi + ds.lo (two products), so that the gradients keep
    the relative-position property too: ds is position-invariant once the scores are, but a
    rotated k rounded once to bf16 is not (2^-9 relative, varying with the absolute position).
    fp16 inputs take (hi + lo) rounded to fp16 (2^-12), one fp16 product. "fp32": fp32 products."""
    if QKP == 1:
        if ds.dtype == tl.bfloat16:
            g = _dot(ds, x, PREC, UPCAST)
            g += _dot(ds, x_lo, PREC, UPCAST)
            return g
        else:
            xr = (x.to(tl.float32) + x_lo.to(tl.float32)).to(ds.dtype)
            return _dot(ds, xr, PREC, UPCAST)
    elif QKP == 2:
        return tl.dot(ds.to(tl.float32), x, input_precision="ieee")
    else:
        return _dot(ds, x, PREC, UPCAST)


# ---------------------------------------------------------------------------
# launch configs


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


QK_PRECISIONS = ("bf16", "bf16x3", "fp32")


def tile_meta(D: int, rotary_dim: int, interleaved: bool, dtype: torch.dtype, qk_precision: str = "bf16",
              map_code: int = 0) -> dict:
    """Constexprs describing the head layout: rotary halves (BH wide) and the tail (BT wide),
    and QKP, how the rotated halves are multiplied (0 "bf16": rounded to the input dtype,
    1 "bf16x3": split into bf16 hi + lo, 2 "fp32"). qk_precision only matters with rotary and
    16-bit inputs: unrotated 16-bit q/k are exact in their dtype, and fp32 inputs multiply in fp32.
    MAP: the position map's code (posattn.position_maps; 0 none), with rotary only."""
    rope = rotary_dim > 0
    tail = D - rotary_dim
    qkp = QK_PRECISIONS.index(qk_precision) if rope and dtype in (torch.float16, torch.bfloat16) else 0
    return dict(
        D=D, BD=_pow2(D), ROT=rotary_dim, BH=_pow2(rotary_dim // 2) if rope else 16,
        R_HALF=max(rotary_dim // 2, 1), BT=_pow2(tail) if tail > 0 else 16,
        INTERLEAVED=bool(interleaved), ROPE=rope, HAS_TAIL=tail > 0,
        PREC="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=(dtype == torch.bfloat16 or qkp == 1) and interpreting(), QKP=qkp,
        MAP=int(map_code) if rope else 0,
    )


# opt-in shared memory per block: H100/H200 227 KB, A100 163 KB, sm_86/sm_89 (RTX 30/40, L4,
# L40S, A10) 99 KB
SMEM_HOPPER = 232448
SMEM_LARGE = 160 * 1024


def default_config(head_dim: int, dtype: torch.dtype, interpret: bool, smem_per_block: int | None = None,
                   rope: bool = False) -> dict:
    """Launch config: block sizes of the forward and of the backward, warps and stages.

    bf16/fp16 with head_dim <= 128 on GPUs with at least 160 KB of shared memory per block:
    the fastest of the configs timed on an H200 by ``benchmarks/bench_anchor_attention.py
    --sweep`` (64x64 blocks, 4 warps; 3 stages forward, 2 backward). Wider tiles (fp32,
    head_dim > 128) and GPUs with less shared memory (``smem_per_block``, default: an H100's)
    get smaller blocks and fewer stages, chosen so that every kernel fits (the sizes come from
    compiling them for sm_90a, sm_80 and sm_89: tests/attention/test_flash_attn_aot.py).
    With ``rope`` each key tile also loads its fp32 cos/sin rows ([BLOCK_N, R/2] twice), which
    the pipeliner stages too: wide tiles on GPUs below Hopper's shared memory then run one stage
    (sm_80 fp32 head_dim 256 needed 197 KB forward with two, sm_89 bf16 head_dim 256 103 KB).
    """
    cfg = _default_config(head_dim, dtype, interpret, smem_per_block)
    limit = SMEM_HOPPER if smem_per_block is None else int(smem_per_block)
    if rope and not interpret and limit < SMEM_HOPPER and (dtype == torch.float32 or head_dim > 128):
        cfg = dict(cfg, num_stages=1, bwd_num_stages=1)
    return cfg


def _default_config(head_dim: int, dtype: torch.dtype, interpret: bool, smem_per_block: int | None) -> dict:
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BWD_BLOCK_M": 16, "BWD_BLOCK_N": 16,
                "num_warps": 4, "num_stages": 1, "bwd_num_warps": 4, "bwd_num_stages": 1}
    limit = SMEM_HOPPER if smem_per_block is None else int(smem_per_block)
    wide = dtype == torch.float32 or head_dim > 128
    widest = dtype == torch.float32 and head_dim > 128
    cfg = {"num_warps": 4, "bwd_num_warps": 4}
    if limit >= SMEM_LARGE:
        if not wide:
            return dict(cfg, BLOCK_M=64, BLOCK_N=64, BWD_BLOCK_M=64, BWD_BLOCK_N=64, num_stages=3, bwd_num_stages=2)
        return dict(cfg, BLOCK_M=64, BLOCK_N=32 if head_dim > 128 else 64, BWD_BLOCK_M=32,
                    BWD_BLOCK_N=32 if widest else 64, num_stages=2, bwd_num_stages=1 if widest else 2)
    if widest:
        return dict(cfg, BLOCK_M=32, BLOCK_N=16, BWD_BLOCK_M=16, BWD_BLOCK_N=32, num_stages=1, bwd_num_stages=1)
    return dict(cfg, BLOCK_M=64, BLOCK_N=32 if wide else 64, BWD_BLOCK_M=32, BWD_BLOCK_N=32 if wide else 64,
                num_stages=2, bwd_num_stages=1 if wide else 2)

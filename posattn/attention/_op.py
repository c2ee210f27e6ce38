"""The torch.library ops behind anchor_attention (forward, backward) and their autograd.

``posattn::anchor_attention`` takes the mask's lowered visit lists as tensors when the caller has
them (a plan, or the eager path that lowers once), else lowers inside (torch.compile without a
plan). It returns ``(out, lse, table)``: ``table`` is the call's fp32 cos/sin [n, 2, rows, T, R/2]
(posattn.rope.table; shape [0] without rope), built once in the forward and kept for the
backward. The autograd context keeps the lists: the backward reuses the forward's when they
carry the transpose for the backward's block sizes, and lowers only otherwise.

lists / blocks encoding (both empty: lower inside):
    blocks = [bm, bn]             lists = forward lists (6 tensors, or 10 with the transpose)
    blocks = [bm, bn, bbm, bbn]   lists = forward lists (6 or 10) + backward lists (10)
"""
from __future__ import annotations

import torch

from posattn import dispatch
from posattn.attention.backends import AttnKey, Rope
from posattn.attention.masks import BlockLists, MaskSpec, lower
from posattn.lowered import token_bucket

FWD_FIELDS = ("doc_start", "row_start", "q_offsets", "q_nfull", "q_kv_idx", "q_kv_masked")
BWD_FIELDS = FWD_FIELDS + ("k_offsets", "k_nfull", "k_q_idx", "k_q_masked")


def pack(lists: BlockLists) -> list[torch.Tensor]:
    """The tensors of ``lists`` (10 with the transpose, else 6), in FWD/BWD_FIELDS order."""
    fields = BWD_FIELDS if lists.k_offsets is not None else FWD_FIELDS
    return [getattr(lists, f) for f in fields]


def unpack(tensors, block_m: int, block_n: int) -> BlockLists:
    """BlockLists from :func:`pack`'s tensors (no host sync: nnz is a shape; max_per_q unknown, -1)."""
    d = dict(zip(BWD_FIELDS, tensors))
    return BlockLists(block_m, block_n, d["doc_start"], d["row_start"], d["q_offsets"], d["q_nfull"], d["q_kv_idx"],
                      d["q_kv_masked"], d.get("k_offsets"), d.get("k_nfull"), d.get("k_q_idx"), d.get("k_q_masked"),
                      int(d["q_kv_idx"].shape[0]), -1)


def split_lists(lists, blocks):
    """(forward tensors, backward tensors or None, backward blocks or None) of the op's encoding."""
    if not blocks:
        return None, None, None
    if len(blocks) == 2:
        fwd = list(lists)
        bwd = fwd if len(fwd) == len(BWD_FIELDS) else None
        return fwd, bwd, (blocks[0], blocks[1]) if bwd is not None else None
    n = len(lists) - len(BWD_FIELDS)
    return list(lists[:n]), list(lists[n:]), (blocks[2], blocks[3])


def key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors, qk_precision="bf16", map_code=0) -> AttnKey:
    T, HQ, D = q.shape
    return AttnKey(q.device.type, str(q.dtype).removeprefix("torch."), D, HQ, k.shape[1], rotary_dim, interleaved,
                   causal, window >= 0, num_anchors > 0, token_bucket(T),
                   q.device.index if q.device.type == "cuda" and q.device.index is not None else -1,
                   qk_precision if rotary_dim else "bf16", map_code if rotary_dim else 0)


def _rope(positions, inv_freq, rotary_dim, interleaved, rope_scaling, table, qk_precision, extras,
          pmap=(0, 0, 0.0, None)):
    if positions is None:
        return None
    from posattn.lowered import RopeTables
    from posattn.position_maps import from_kernel_args

    pa, ps, po = extras
    tables = RopeTables(inv_freq, rope_scaling, pa, positions.shape[0] if positions.dim() == 2 else 1, ps, po)
    return Rope(positions, inv_freq, rotary_dim, interleaved, rope_scaling, table, qk_precision, tables,
                from_kernel_args(*pmap))


def map_tables(positions, tables, position_map, backend):
    """fp32 [3, 2, rows, T, R/2]: the near table (q and k), then the far rotation's tables of q
    and of k at the map's far positions [T] (computed on the device, int64 or fp32 as the map
    rounds them; posattn.position_maps), built by the same exact-angle routine."""
    from posattn.rope.table import attention_tables

    near = attention_tables(positions, tables, backend=backend)
    fq = attention_tables(position_map.far_q(positions), tables, backend=backend)
    fk = attention_tables(position_map.far_k(positions), tables, backend=backend)
    return torch.cat((near, fq, fk))


def table_shape(positions, inv_freq, pair_q_offset, rotary_dim, map_code=0):
    """Shape of the op's table output (posattn.rope.table.attention_tables): [n, 2, rows, T, R/2]
    (n = 3 with a position map: near, far q, far k)."""
    if positions is None:
        return (0,)
    rows = inv_freq.shape[0] if inv_freq.dim() == 2 else 1
    n = 3 if map_code else (2 if pair_q_offset is not None else 1)
    return (n, 2, rows, positions.shape[-1], rotary_dim // 2)


@torch.library.custom_op("posattn::anchor_attention", mutates_args=())
def anchor_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        cu_rows: torch.Tensor, lists: list[torch.Tensor], blocks: list[int], num_anchors: int,
                        causal: bool, window: int, softmax_scale: float, positions: torch.Tensor | None,
                        inv_freq: torch.Tensor | None, rotary_dim: int, interleaved: bool, rope_scaling: float,
                        backend: str, qk_precision: str, pair_axis: torch.Tensor | None,
                        pair_pos_scale: torch.Tensor | None,
                        pair_q_offset: torch.Tensor | None, map_code: int = 0, map_window: int = 0,
                        map_param: float = 0.0,
                        visual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """map_code, map_window, map_param, visual: posattn.position_maps.kernel_args of the
    position map (0, 0, 0.0, None: none)."""
    from posattn.rope.table import attention_tables

    key = key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors, qk_precision, map_code)
    kernel, config = dispatch.select("anchor_attention", key, backend=backend or None,
                                     device_index=q.device.index)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=None if window < 0 else window)
    pmap = (map_code, map_window, map_param, visual)
    table = q.new_empty((0,), dtype=torch.float32)
    if positions is not None:
        rope = _rope(positions, inv_freq, rotary_dim, interleaved, rope_scaling, None, qk_precision,
                     (pair_axis, pair_pos_scale, pair_q_offset), pmap)
        if rope.position_map is not None:
            table = map_tables(positions, rope.tables, rope.position_map, kernel.fn.table_backend)
        else:
            table = attention_tables(positions, rope.tables, backend=kernel.fn.table_backend)
    fwd = None
    fwd_t, _, _ = split_lists(lists, blocks)
    if fwd_t is None:
        # nobody checked this layout (torch.compile without a plan, or the reference's plan)
        from posattn.attention.anchor import check_boundary_values

        check_boundary_values(q.shape[0], cu_seqlens, cu_rows, num_anchors)
    if kernel.fn.uses_lists:
        if fwd_t is not None:
            config = dict(config, BLOCK_M=blocks[0], BLOCK_N=blocks[1])
            fwd = unpack(fwd_t, blocks[0], blocks[1])
        else:
            fwd = lower(spec, cu_seqlens, cu_rows, q.shape[0], config["BLOCK_M"], config["BLOCK_N"], transpose=False)
    out, lse = kernel.fn(q, k, v, cu_seqlens, cu_rows, fwd, spec, softmax_scale,
                         _rope(positions, inv_freq, rotary_dim, interleaved, rope_scaling, table, qk_precision,
                               (pair_axis, pair_pos_scale, pair_q_offset), pmap), config)
    return out, lse, table


@anchor_attention_op.register_fake
def _(q, k, v, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal, window, softmax_scale, positions, inv_freq,
      rotary_dim, interleaved, rope_scaling, backend, qk_precision, pair_axis, pair_pos_scale, pair_q_offset,
      map_code=0, map_window=0, map_param=0.0, visual=None):
    T, HQ, _ = q.shape
    table = q.new_empty(table_shape(positions, inv_freq, pair_q_offset, rotary_dim, map_code), dtype=torch.float32)
    return torch.empty_like(q), q.new_empty((HQ, T), dtype=torch.float32), table


@torch.library.custom_op("posattn::anchor_attention_backward", mutates_args=())
def anchor_attention_bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, table: torch.Tensor,
                            cu_seqlens: torch.Tensor, cu_rows: torch.Tensor, lists: list[torch.Tensor],
                            blocks: list[int], num_anchors: int, causal: bool, window: int, softmax_scale: float,
                            positions: torch.Tensor | None, inv_freq: torch.Tensor | None, rotary_dim: int,
                            interleaved: bool, rope_scaling: float,
                            backend: str, qk_precision: str, pair_axis: torch.Tensor | None,
                            pair_pos_scale: torch.Tensor | None,
                            pair_q_offset: torch.Tensor | None, map_code: int = 0, map_window: int = 0,
                            map_param: float = 0.0,
                            visual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lists``/``blocks``: the backward's lists with the transpose (10 tensors) for
    [BWD_BLOCK_M, BWD_BLOCK_N], or both empty to lower here."""
    key = key_of(q, k, rotary_dim, interleaved, causal, window, num_anchors, qk_precision, map_code)
    kernel, config = dispatch.select("anchor_attention", key, backend=backend or None,
                                     device_index=q.device.index)
    spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=None if window < 0 else window)
    bwd = None
    if kernel.fn.uses_lists:
        if blocks:
            config = dict(config, BWD_BLOCK_M=blocks[0], BWD_BLOCK_N=blocks[1])
            bwd = unpack(lists, blocks[0], blocks[1])
        else:
            # a backend without backward block sizes (the C++ kernel) uses the forward's
            bm, bn = config.get("BWD_BLOCK_M", config["BLOCK_M"]), config.get("BWD_BLOCK_N", config["BLOCK_N"])
            bwd = lower(spec, cu_seqlens, cu_rows, q.shape[0], bm, bn)
        # the kernels read the backward's block sizes from the lists, the warps/stages from config
    rope = _rope(positions, inv_freq, rotary_dim, interleaved, rope_scaling, table, qk_precision,
                 (pair_axis, pair_pos_scale, pair_q_offset), (map_code, map_window, map_param, visual))
    return kernel.fn.backward(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_rows, bwd, spec, softmax_scale, rope,
                              config)


@anchor_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, table, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal, window,
      softmax_scale, positions, inv_freq, rotary_dim, interleaved, rope_scaling, backend, qk_precision, pair_axis,
      pair_pos_scale, pair_q_offset, map_code=0, map_window=0, map_param=0.0, visual=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal, window, softmax_scale, positions, inv_freq,
     rotary_dim, interleaved, rope_scaling, backend, qkp, *extras) = inputs
    # the position map's (code, window, param, visual) come last (defaults when left out)
    extras, (map_code, map_window, map_param, visual) = extras[:3], (tuple(extras[3:]) + (0, 0, 0.0, None)[
        len(extras) - 3:])
    out, lse, table = output
    ctx.mark_non_differentiable(table)
    _, bwd_t, bwd_blocks = split_lists(lists, blocks)
    bwd_t = bwd_t or []
    ctx.bwd_blocks = list(bwd_blocks) if bwd_blocks else []
    ctx.n_lists = len(bwd_t)
    ctx.save_for_backward(q, k, v, out, lse, table, cu_seqlens, cu_rows, positions, inv_freq, *extras, visual,
                          *bwd_t)
    ctx.args = (num_anchors, causal, window, softmax_scale, rotary_dim, interleaved, rope_scaling, backend,
                qkp)
    ctx.pmap = (map_code, map_window, map_param)
    ctx.input_lens = (len(lists), len(blocks))


def _backward(ctx, dout, dlse, _dtable):
    q, k, v, out, lse, table, cu_seqlens, cu_rows, positions, inv_freq, pa, ps, po, visual, *bwd_t = ctx.saved_tensors
    num_anchors, causal, window, softmax_scale, rotary_dim, interleaved, rope_scaling, backend, qkp = ctx.args
    if dlse is not None and dlse.__class__ is torch.Tensor and dout.__class__ is not torch.Tensor:
        dlse = None         # autograd's plain zeros for an unused lse beside DTensors: no lse gradient
    dq, dk, dv = anchor_attention_bwd_op(dout.contiguous(), dlse, q, k, v, out, lse, table, cu_seqlens, cu_rows,
                                         bwd_t, ctx.bwd_blocks, num_anchors, causal, window, softmax_scale,
                                         positions, inv_freq, rotary_dim, interleaved, rope_scaling, backend, qkp,
                                         pa, ps, po, *ctx.pmap, visual)
    n_lists, n_blocks = ctx.input_lens
    # one gradient per input, in its structure (pytree: a list of ints takes None, an empty
    # list []); none flows into the boundaries, lists or rope
    # (trailing arguments left at their defaults are not among the inputs: count them)
    n_rest = len(ctx.needs_input_grad) - 7
    return (dq, dk, dv, None, None, [None] * n_lists, None if n_blocks else []) + (None,) * n_rest


anchor_attention_op.register_autograd(_backward, setup_context=_setup_context)

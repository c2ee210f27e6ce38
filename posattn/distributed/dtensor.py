"""DTensor sharding rules for posattn's custom ops (torch.distributed.tensor.experimental.register_sharding).

Each op runs on the local shards with no communication, for these placements (per mesh dimension):

    op                                    replicated   heads          sequence                 batch
    posattn::rope         q, k [B,S,H,D]  yes          Shard(2)       Shard(1), positions      Shard(0)
                          pos3 [A,Bp,S]                  (replicated)   Shard(2) (global values)  (Shard(1) if Bp>1)
    posattn::rope_angles  angles [Ba,S,Ha,R/2]  yes    Shard(2)*      Shard(1), angles Shard(1) Shard(0)
    posattn::rope_cos_sin q, k by layout  yes          head dim       seq dim; per-token tables  batch dim
                                                                        or positions sharded with it
    posattn::anchor_attention (+ _backward)  yes       Shard(1)**     -> posattn.distributed.anchor_attention
                          out [T,Hq,D] Shard(1), lse [Hq,T] Shard(0)
    posattn::decode_attention (lowered)   yes          q Shard(1), caches Shard(2)**, out/lse Shard(1); batch:
                                                       the public op (posattn.distributed.dtensor_decode)
    posattn::rope_and_cache (lowered)     yes          q, k, v Shard(1), caches on their head dim (exactly:
                                                       they are written in place, never sliced copies)
    posattn::kv_compact (lowered)         yes          caches on their head dim; or batch: everything
                                                       Shard(0) with a contiguous cache (exactly, as above)

    *  angles with Ha > 1 rows are sharded on their rows too; Ha = 1 stays replicated.
    ** Hq and Hk both divisible by the mesh dimension's size (GQA groups stay whole).

A sequence-sharded RoPE is exact because positions are data: the shard's positions hold the
*global* positions of its tokens (posattn.distributed.shard_positions), or are replicated and
sliced locally. A replicated input where a rule shards it is sliced locally (no
communication; backward gradients often arrive replicated). Anything that would need
communication (a sharded head_dim, Partial, q and k sharded differently, positions sharded
while q is not, sequence-sharded attention, which needs the ring) raises an error naming the
placements before anything runs: DTensor never silently moves data for these ops.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.experimental import register_sharding

R = Replicate()


def _shape(spec):
    return tuple(spec.tensor_meta.shape) if spec.tensor_meta is not None else None


def _local(p, c) -> bool:
    """Can placement p become c without communication? (equal, or a replicated tensor sliced)"""
    return p == c or (isinstance(p, Replicate) and isinstance(c, Shard))


def _fits(c: dict, specs: dict, n: int) -> bool:
    """Every tensor the candidate shards has at least n entries on that dimension (DTensor's rule)."""
    return all(_shape(specs[name]) is None or _shape(specs[name])[p.dim] >= n
               for name, p in c.items() if name in specs and isinstance(p, Shard))


def _strategies(op: str, names, args, cands, hint: str):
    """Check every mesh dimension's placements against the candidates, then return those each
    mesh dimension reaches without communication.

    cands: list of (label, {arg name: placement}, [output placements]); an arg missing from a
    candidate must not be a tensor (None placement). Replicated inputs are accepted where a
    candidate shards them (a local slice: replicated positions hold every token's global
    position, so their slice is the shard's); anything needing communication is an error."""
    specs = {n: a for n, a in zip(names, args) if isinstance(a, DTensorSpec)}
    mesh = next(iter(specs.values())).mesh
    keep = set()
    for i in range(mesh.ndim):
        got = {n: s.placements[i] for n, s in specs.items()}
        if all(isinstance(p, Replicate) for p in got.values()):
            keep.add(0)                         # the replicated candidate: replicated in, replicated out
            continue
        ok = [j for j, (_, c, _) in enumerate(cands) if all(_local(p, c.get(n)) for n, p in got.items())]
        fits = [j for j in ok if _fits(cands[j][1], specs, mesh.size(i))]
        if ok and not fits:
            label, c, _ = cands[ok[0]]
            short = [f"{n} dim {c[n].dim} has {_shape(specs[n])[c[n].dim]}" for n in specs
                     if isinstance(c.get(n), Shard) and _shape(specs[n])[c[n].dim] < mesh.size(i)]
            raise ValueError(f"{op}: the {label} placement shards fewer entries than the {mesh.size(i)} ranks of "
                             f"mesh dimension {i} ({', '.join(short)})")
        ok = fits
        if not ok:
            placed = ", ".join(f"{n} {p}" for n, p in got.items())
            allowed = "; ".join(f"{label}: " + ", ".join(f"{n} {p}" for n, p in c.items() if n in specs)
                                for label, c, _ in cands)
            raise ValueError(f"{op}: unsupported DTensor placements on mesh dimension {i}: {placed}. Supported "
                             f"(each runs locally, nothing is communicated): {allowed}.{hint}")
        keep.update(ok)
    return [(cands[j][2], [cands[j][1].get(n) if isinstance(a, DTensorSpec) else None for n, a in zip(names, args)])
            for j in sorted(keep)]


# ---------------------------------------------------------------------------
# posattn::rope(q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, attention_scaling,
#               rotary_dim, interleaved, sign, backend) -> (q_out, k_out)

_ROPE = ("q", "k", "positions", "inv_freq", "pair_axis", "pair_pos_scale", "pair_q_offset")


@register_sharding(torch.ops.posattn.rope.default)
def _rope_rule(q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset, *scalars):
    args = (q, k, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset)
    tables = {n: R for n, a in zip(_ROPE[3:], args[3:]) if a is not None}
    pshape = _shape(pos3)
    cands = [("replicated", dict(q=R, k=R, positions=R, **tables), [R, R]),
             ("sequence", dict(q=Shard(1), k=Shard(1), positions=Shard(2), **tables), [Shard(1), Shard(1)]),
             ("batch", dict(q=Shard(0), k=Shard(0), positions=Shard(1) if pshape and pshape[1] > 1 else R,
                            **tables), [Shard(0), Shard(0)])]
    if inv_freq.tensor_meta is None or len(inv_freq.tensor_meta.shape) == 1:
        cands.insert(1, ("heads", dict(q=Shard(2), k=Shard(2), positions=R, **tables), [Shard(2), Shard(2)]))
        cands.insert(2, ("heads of q (k replicated)", dict(q=Shard(2), k=R, positions=R, **tables), [Shard(2), R]))
    return _strategies("posattn::rope (apply_rope)", _ROPE, args, cands,
                       " Per-head frequency tables cannot be head-sharded yet." if len(cands) == 3 else
                       " A sequence shard needs positions sharded with it, holding global positions "
                       "(posattn.distributed.shard_positions).")


# ---------------------------------------------------------------------------
# posattn::rope_angles(q, k, angles, rotary_dim, interleaved, sign, backend)

@register_sharding(torch.ops.posattn.rope_angles.default)
def _rope_angles_rule(q, k, angles, *scalars):
    ash = _shape(angles)
    rows = ash[2] if ash else 1
    cands = [("replicated", dict(q=R, k=R, angles=R), [R, R]),
             ("heads", dict(q=Shard(2), k=Shard(2), angles=R if rows == 1 else Shard(2)), [Shard(2), Shard(2)]),
             ("heads of q (k replicated)", dict(q=Shard(2), k=R, angles=R), [Shard(2), R]),
             ("sequence", dict(q=Shard(1), k=Shard(1), angles=Shard(1)), [Shard(1), Shard(1)]),
             ("batch", dict(q=Shard(0), k=Shard(0), angles=Shard(0) if ash and ash[0] > 1 else R),
              [Shard(0), Shard(0)])]
    return _strategies("posattn::rope_angles (apply_rope_angles)", ("q", "k", "angles"), (q, k, angles),
                       cands, "")


# ---------------------------------------------------------------------------
# posattn::rope_cos_sin(q, k?, tab_a, tab_b, positions?, rotary_dim, form, layout, interleaved, conj,
#                       check_bounds, backend)

_DIMS = {"bshd": (2, 1, 0), "bhsd": (1, 2, 0), "thd": (1, 0, None)}     # heads, sequence, batch


@register_sharding(torch.ops.posattn.rope_cos_sin.default)
def _rope_cos_sin_rule(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, *rest):
    h, s, b = _DIMS[layout]
    names = ("q", "k", "cos", "sin", "positions")
    args = (q, k, tab_a, tab_b, positions)
    tshape = _shape(tab_a)
    tnd = len(tshape) if tshape else 2
    ko = lambda p: p if k is not None else R            # noqa: E731  (k None: an empty [0] output)
    base = lambda **kw: {n: v for n, v in kw.items() if n in ("q", "cos", "sin") or  # noqa: E731
                         (n == "k" and k is not None) or (n == "positions" and positions is not None)}
    cands = [("replicated", base(q=R, k=R, cos=R, sin=R, positions=R), [R, ko(R)]),
             ("heads", base(q=Shard(h), k=Shard(h), cos=R, sin=R, positions=R), [Shard(h), ko(Shard(h))]),
             ("heads of q (k replicated)", base(q=Shard(h), k=R, cos=R, sin=R, positions=R), [Shard(h), R])]
    if positions is None:        # per-token tables [S, W], [B|1, S, W] ([T, W] for thd): sharded with q
        seq_tab = Shard(tnd - 2)
        cands.append(("sequence", base(q=Shard(s), k=Shard(s), cos=seq_tab, sin=seq_tab),
                      [Shard(s), ko(Shard(s))]))
    else:                        # a table indexed by positions [S], [B, S] ([T]): positions sharded with q
        pnd = len(_shape(positions) or (0,))
        cands.append(("sequence", base(q=Shard(s), k=Shard(s), cos=R, sin=R, positions=Shard(pnd - 1)),
                      [Shard(s), ko(Shard(s))]))
    if b is not None:
        bt = Shard(0) if positions is None and tnd == 3 and tshape[0] > 1 else R
        bp = Shard(0) if positions is not None and len(_shape(positions) or (0,)) == 2 else R
        cands.append(("batch", base(q=Shard(b), k=Shard(b), cos=bt, sin=bt, positions=bp),
                      [Shard(b), ko(Shard(b))]))
    return _strategies("posattn::rope_cos_sin (apply_rope_cos_sin)", names, args, cands, "")


# ---------------------------------------------------------------------------
# posattn::anchor_attention(q, k, v, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal, window,
#                           softmax_scale, positions?, inv_freq?, rotary_dim, interleaved, rope_scaling, backend)
#   -> (out, lse, table); the block lists (a list of tensors) and the cos/sin table are replicated

_SEQ_HINT = (" A sequence-sharded anchor attention needs K/V from other ranks: use "
             "posattn.distributed.anchor_attention (context parallelism) on the local shards.")


def _check_heads(op, specs, mesh):
    q, k = specs["q"], specs["k"]
    for i, p in enumerate(q.placements):
        if p != Shard(1):
            continue
        n = mesh.size(i)
        hq, hk = _shape(q)[1], _shape(k)[1]
        if hq % n or hk % n:
            raise ValueError(f"{op}: heads sharded over {n} ranks need q's ({hq}) and k's ({hk}) head counts "
                             f"divisible by {n} (GQA groups stay whole)")


def _flat(names, args):
    """Tensor-list arguments (the block lists) become one replicated entry per tensor, in order."""
    fn, fa = [], []
    for n, a in zip(names, args):
        if isinstance(a, (list, tuple)):
            fn += [f"{n}[{j}]" for j in range(len(a))]
            fa += list(a)
        else:
            fn.append(n)
            fa.append(a)
    return fn, fa


def _attention_rule(op, names, args, rest, heads, outs_heads, n_out):
    """``rest``: the op's trailing arguments (scalars, and tensors such as per-pair rope tables,
    which are replicated)."""
    names, args = _flat(names + tuple(f"table {i}" for i in range(len(rest))), args + tuple(rest))
    specs = {n: a for n, a in zip(names, args) if isinstance(a, DTensorSpec)}
    rep = {n: R for n in specs}
    cands = [("replicated", rep, [R] * n_out)]
    inv = specs.get("inv_freq")
    if inv is None or _shape(inv) is None or len(_shape(inv)) == 1:      # per-head frequencies: not head-sharded
        cands.append(("heads", dict(rep, **{n: p for n, p in heads.items() if n in specs}), outs_heads))
    out = _strategies(op, names, args, cands, _SEQ_HINT)
    _check_heads(op, specs, next(iter(specs.values())).mesh)
    return out


@register_sharding(torch.ops.posattn.anchor_attention.default)
def _anchor_rule(q, k, v, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal, window, softmax_scale,
                 positions, inv_freq, *rest):
    names = ("q", "k", "v", "cu_seqlens", "cu_rows", "lists", "positions", "inv_freq")
    args = (q, k, v, cu_seqlens, cu_rows, lists, positions, inv_freq)
    return _attention_rule("posattn::anchor_attention", names, args, rest, dict(q=Shard(1), k=Shard(1), v=Shard(1)),
                           [Shard(1), Shard(0), R], 3)


@register_sharding(torch.ops.posattn.anchor_attention_backward.default)
def _anchor_bwd_rule(dout, dlse, q, k, v, out, lse, table, cu_seqlens, cu_rows, lists, blocks, num_anchors, causal,
                     window, softmax_scale, positions, inv_freq, *rest):
    names = ("dout", "dlse", "q", "k", "v", "out", "lse", "table", "cu_seqlens", "cu_rows", "lists", "positions",
             "inv_freq")
    args = (dout, dlse, q, k, v, out, lse, table, cu_seqlens, cu_rows, lists, positions, inv_freq)
    heads = dict(dout=Shard(1), dlse=Shard(0), q=Shard(1), k=Shard(1), v=Shard(1), out=Shard(1), lse=Shard(0))
    return _attention_rule("posattn::anchor_attention_backward", names, args, rest, heads, [Shard(1)] * 3, 3)


# ---------------------------------------------------------------------------
# posattn::decode_attention(q [T,Hq,D], k_cache [nb,ps,Hk,D], v_cache, block_table, cache_seqlens, cu_seqlens_q,
#                           tree_mask?, causal, window, softmax_scale, num_splits, max_q, backend, kv_indices?)
#   -> (out [T,Hq,D], lse [T,Hq]): the lowered op (public decode_attention on DTensors runs the local
#   shards itself, posattn.distributed.dtensor_decode); this rule serves direct and compiled calls

_DECODE = ("q", "k_cache", "v_cache", "block_table", "cache_seqlens", "cu_seqlens_q", "tree_mask")


@register_sharding(torch.ops.posattn.decode_attention.default)
def _decode_rule(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, causal, window,
                 softmax_scale, num_splits, max_q, backend, kv_indices=None):
    names = _DECODE + ("kv_indices",)
    args = (q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, tree_mask, kv_indices)
    specs = {n: a for n, a in zip(names, args) if isinstance(a, DTensorSpec)}
    rep = {n: R for n in specs}
    heads = dict(rep, **{n: p for n, p in (("q", Shard(1)), ("k_cache", Shard(2)), ("v_cache", Shard(2)),
                                           ("kv_indices", Shard(1))) if n in specs})
    out = _strategies("posattn::decode_attention", names, args,
                      [("replicated", rep, [R, R]), ("heads", heads, [Shard(1), Shard(1)])],
                      " The lowered op's requests share one page pool: batch placements run through the "
                      "public posattn.decode_attention (contiguous cache).")
    mesh = next(iter(specs.values())).mesh
    for i in range(mesh.ndim):
        n = mesh.size(i)
        if isinstance(specs["q"].placements[i], Shard) or any(isinstance(specs[x].placements[i], Shard)
                                                               for x in ("k_cache", "v_cache") if x in specs):
            hq, hk = _shape(specs["q"])[1], _shape(k_cache)[2] if isinstance(k_cache, DTensorSpec) else None
            if hq % n or (hk is not None and hk % n):
                raise ValueError(f"posattn::decode_attention: heads sharded over {n} ranks need q's ({hq}) and the "
                                 f"cache's ({hk}) head counts divisible by {n} (GQA groups stay whole)")
    return out


# ---------------------------------------------------------------------------
# posattn::rope_and_cache(q [T,Hq,D], k [T,Hk,D], v, k_cache, v_cache, slots, pos3, inv_freq, pair_axis?,
#                         pair_pos_scale?, pair_q_offset?, attention_scaling, rotary_dim, interleaved,
#                         rotate_k, hnd, backend) -> rotated q; writes k_cache / v_cache in place

_CACHE = ("q", "k", "v", "k_cache", "v_cache", "slots", "positions", "inv_freq", "pair_axis", "pair_pos_scale",
          "pair_q_offset")


@register_sharding(torch.ops.posattn.rope_and_cache.default)
def _rope_cache_rule(q, k, v, k_cache, v_cache, slots, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset,
                     attention_scaling, rotary_dim, interleaved, rotate_k, hnd, backend):
    op = "posattn::rope_and_cache"
    args = (q, k, v, k_cache, v_cache, slots, pos3, inv_freq, pair_axis, pair_pos_scale, pair_q_offset)
    specs = {n: a for n, a in zip(_CACHE, args) if isinstance(a, DTensorSpec)}
    ch = 1 if hnd else 2
    # the caches are written in place: they must arrive placed exactly as the rule runs them (a
    # replicated cache sliced to a shard would be a copy, and the write would be lost)
    for i in range(next(iter(specs.values())).mesh.ndim):
        want = Shard(ch) if specs["q"].placements[i] == Shard(1) else R
        for n in ("k_cache", "v_cache"):
            if n in specs and specs[n].placements[i] != want:
                raise ValueError(f"{op}: {n} is written in place and must be placed {want} on mesh dimension {i} "
                                 f"(q is {specs['q'].placements[i]}); got {specs[n].placements[i]}")
    rep = {n: R for n in specs}
    heads = dict(rep, **{n: p for n, p in (("q", Shard(1)), ("k", Shard(1)), ("v", Shard(1)),
                                           ("k_cache", Shard(ch)), ("v_cache", Shard(ch))) if n in specs})
    cands = [("replicated", rep, [R])]
    inv = specs.get("inv_freq")
    if inv is None or _shape(inv) is None or len(_shape(inv)) == 1:      # per-head frequencies: not head-sharded
        cands.append(("heads", heads, [Shard(1)]))
    out = _strategies(op, _CACHE, args, cands, " Tokens cannot be sharded: slots are global slots of one page pool.")
    mesh = next(iter(specs.values())).mesh
    for i in range(mesh.ndim):
        if specs["q"].placements[i] == Shard(1):
            n, hq, hk = mesh.size(i), _shape(specs["q"])[1], _shape(k)[1] if isinstance(k, DTensorSpec) else 0
            if hq % n or hk % n:
                raise ValueError(f"{op}: heads sharded over {n} ranks need q's ({hq}) and k's ({hk}) head counts "
                                 f"divisible by {n} (GQA groups stay whole)")
    return out


# ---------------------------------------------------------------------------
# posattn::kv_compact(k_cache, v_cache, cache_seqlens, src, counts, block_table?, hnd, backend) -> None;
#   writes the caches and cache_seqlens in place

_COMPACT = ("k_cache", "v_cache", "cache_seqlens", "src", "counts", "block_table")


@register_sharding(torch.ops.posattn.kv_compact.default)
def _kv_compact_rule(k_cache, v_cache, cache_seqlens, src, counts, block_table, hnd, backend):
    op = "posattn::kv_compact"
    args = (k_cache, v_cache, cache_seqlens, src, counts, block_table)
    specs = {n: a for n, a in zip(_COMPACT, args) if isinstance(a, DTensorSpec)}
    ch = 1 if hnd else 2
    rep = {n: R for n in specs}
    cands = [("replicated", rep, []), ("heads", dict(rep, k_cache=Shard(ch), v_cache=Shard(ch)), [])]
    if block_table is None:
        cands.append(("batch (contiguous cache)", {n: Shard(0) for n in specs}, []))
    mesh = next(iter(specs.values())).mesh
    # every mutated input (caches, cache_seqlens) must arrive placed exactly as a candidate runs it:
    # a sliced copy would take the write
    for i in range(mesh.ndim):
        got = {n: s.placements[i] for n, s in specs.items()}
        if not any(all(c.get(n) == p for n, p in got.items()) for _, c, _ in cands):
            placed = ", ".join(f"{n} {p}" for n, p in got.items())
            allowed = "; ".join(f"{label}: " + ", ".join(f"{n} {p}" for n, p in c.items()) for label, c, _ in cands)
            raise ValueError(f"{op}: unsupported DTensor placements on mesh dimension {i}: {placed} (the caches and "
                             f"cache_seqlens are written in place, so they are never sliced). Supported: {allowed}."
                             + ("" if block_table is None else " A paged cache's pages are one pool shared by the "
                                "batch: shard it on heads."))
    return _strategies(op, _COMPACT, args, cands, "")

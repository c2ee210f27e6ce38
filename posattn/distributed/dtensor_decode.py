"""DTensor rules of the decode ops: decode_attention, rope_and_cache, kv_compact.

The decode ops write into the KV cache in place and read lengths and block tables that the
public functions check on the host, so DTensor inputs are handled at the public function: the
placements are checked per mesh dimension against the layouts below, then the op runs on the
local shards (``to_local``, the cache written in place through its local shard) and the outputs
are wrapped back as DTensors. Nothing is communicated; anything else raises an error naming the
placements and the supported ones (DTensor never silently redistributes).

    op               heads (tensor parallel)                    batch (data parallel)
    decode_attention q, k, v Shard(head dim), k_cache/v_cache    q [B,Tq,Hq,D], k_cache/v_cache [B,S,Hk,D],
                     Shard(2), kv_indices Shard(1); the rest     cache_seqlens, k, v, positions, tree_mask
                     replicated. out/lse Shard(head dim)         [B,Tq,W], kv_indices Shard(0); out/lse
                                                                 Shard(0). Contiguous cache only
    rope_and_cache   q, k, v Shard(1), caches Shard(2) (NHD)     not local: slot_mapping holds global
                     or Shard(1) (HND); positions, slots         slots of a shared page pool
                     replicated. rotated q Shard(1)
    kv_compact       caches on heads; lengths, src, counts,      contiguous caches, cache_seqlens, src,
                     block_table replicated                      counts Shard(0)

Heads: Hq and Hk both divide by the ranks sharding them, so rank r holds query heads
[r Hq/n, (r+1) Hq/n) and exactly their KV heads [r Hk/n, (r+1) Hk/n) (GQA groups stay whole).
A plain tensor beside DTensors counts as replicated. Sharded sizes must divide evenly.
A paged cache is not batch-shardable here: its pages are one pool shared by the batch, and
block_table / slot_mapping hold global page ids.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

R = Replicate()


def _dt(x) -> bool:
    return isinstance(x, DTensor)


def _fmt(p) -> str:
    return "R" if isinstance(p, Replicate) else (f"S({p.dim})" if isinstance(p, Shard) else str(p))


def run_local(op: str, fn, args: dict, cands: list, hint: str = ""):
    """Check ``args``' placements against ``cands`` on every mesh dimension, run ``fn(**local args)``
    and wrap its tensor outputs.

    args: name -> tensor, DTensor or None (None: not given). cands: [(label, {name: placement},
    [output placements])]; a given tensor missing from a candidate rules it out. Returns fn's
    result with each output a DTensor placed by the chosen candidates (None outputs stay None).
    """
    dts = {n: a for n, a in args.items() if _dt(a)}
    mesh = next(iter(dts.values())).device_mesh
    for n, a in dts.items():
        if a.device_mesh != mesh:
            raise ValueError(f"{op}: every DTensor argument must be on one device mesh; {n} is on {a.device_mesh}, "
                             f"not {mesh}")
    given = [n for n, a in args.items() if isinstance(a, torch.Tensor)]
    chosen = []
    for i in range(mesh.ndim):
        got = {n: args[n].placements[i] if n in dts else R for n in given}
        ok = [c for c in cands if all(n in c[1] and c[1][n] == p for n, p in got.items())]
        if not ok:
            placed = ", ".join(f"{n} {_fmt(p)}" for n, p in got.items())
            allowed = "; ".join(f"{label}: " + ", ".join(f"{n} {_fmt(p)}" for n, p in c.items() if n in given)
                                for label, c, _ in cands if all(n in c for n in given))
            raise ValueError(f"{op}: unsupported DTensor placements on mesh dimension {i}: {placed}. Supported "
                             f"(each runs locally, nothing is communicated): {allowed or 'none for these inputs'}."
                             f"{hint}")
        chosen.append(ok[0])
    for n in dts:                        # even shards only (the outputs are wrapped without a global shape)
        for d in range(args[n].dim()):
            ways = 1
            for i in range(mesh.ndim):
                p = args[n].placements[i]
                ways *= mesh.size(i) if isinstance(p, Shard) and p.dim == d else 1
            if args[n].shape[d] % ways:
                raise ValueError(f"{op}: {n} dim {d} has {args[n].shape[d]} entries, not divisible by the "
                                 f"{ways} ranks sharding it")
    out = fn(**{n: a.to_local() if _dt(a) else a for n, a in args.items()})
    many = isinstance(out, tuple)
    outs = out if many else (out,)
    wrapped = tuple(None if o is None else DTensor.from_local(o, mesh, [c[2][j] for c in chosen], run_check=False)
                    for j, o in enumerate(outs))
    return wrapped if many else wrapped[0]


def _heads_divide(op, mesh, pairs):
    """pairs: [(name, tensor, head dim)]: every mesh dimension sharding heads divides each head count."""
    for i in range(mesh.ndim):
        n = mesh.size(i)
        for name, x, hd in pairs:
            if _dt(x) and x.placements[i] == Shard(hd) and x.shape[hd] % n:
                counts = ", ".join(f"{nm} {t.shape[h]}" for nm, t, h in pairs if isinstance(t, torch.Tensor))
                raise ValueError(f"{op}: heads sharded over {n} ranks need every head count divisible by {n} "
                                 f"(GQA groups stay whole); got {counts}")


def decode_attention(fn, q, k_cache, v_cache, cache_seqlens, *, block_table=None, cu_seqlens_q=None, k=None, v=None,
                     positions=None, tree_mask=None, kv_indices=None, page_summary=None, **kw):
    """posattn.decode_attention on DTensors (``fn``: the public op, run on the local shards)."""
    op = "posattn.decode_attention"
    if page_summary is not None:
        raise ValueError(f"{op}: page_summary is not supported with DTensor inputs (run the op on local tensors)")
    h = q.dim() - 2                                   # q's (and k's, v's, lse's) head dim
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                cu_seqlens_q=cu_seqlens_q, k=k, v=v, positions=positions, tree_mask=tree_mask, kv_indices=kv_indices)
    mesh = next(a for a in args.values() if _dt(a)).device_mesh
    _heads_divide(op, mesh, [("q", q, h), ("k_cache", k_cache, 2), ("kv_indices", kv_indices, 1)])
    rep = {n: R for n in args}
    heads = dict(rep, q=Shard(h), k_cache=Shard(2), v_cache=Shard(2), k=Shard(h), v=Shard(h), kv_indices=Shard(1))
    cands = [("replicated", rep, [R, R]), ("heads", heads, [Shard(h), Shard(h)])]
    if q.dim() == 4:                                  # [B, Tq, ...]: a request's rows stay on one rank
        batch = dict(q=Shard(0), k_cache=Shard(0), v_cache=Shard(0), cache_seqlens=Shard(0), k=Shard(0), v=Shard(0),
                     positions=Shard(0), kv_indices=Shard(0))
        if tree_mask is None or tree_mask.dim() == 3:
            batch["tree_mask"] = Shard(0)
        cands.append(("batch (contiguous cache)", batch, [Shard(0), Shard(0)]))

    def run(**a):
        return fn(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a, **kw)

    return run_local(op, run, args, cands, " A paged cache (block_table) is one page pool shared by the batch: "
                     "shard it on heads, or run the op on each rank's local tensors.")


def rope_and_cache(fn, q, k, v, positions, spec, k_cache, v_cache, slot_mapping, *, kv_layout="NHD", **kw):
    """posattn.rope_and_cache on DTensors (``fn``: the public op, run on the local shards)."""
    op = "posattn.rope_and_cache"
    ch = 2 if kv_layout == "NHD" else 1
    args = dict(q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    mesh = next(a for a in args.values() if _dt(a)).device_mesh
    _heads_divide(op, mesh, [("q", q, 1), ("k", k, 1), ("k_cache", k_cache, ch)])
    rep = {n: R for n in args}
    cands = [("replicated", rep, [R])]
    if getattr(spec, "inv_freq_heads", None) is None:     # per-head frequency rows are not sliced with the heads
        cands.append(("heads", dict(rep, q=Shard(1), k=Shard(1), v=Shard(1), k_cache=Shard(ch), v_cache=Shard(ch)),
                      [Shard(1)]))

    def run(**a):
        return fn(a["q"], a["k"], a["v"], a["positions"], spec, a["k_cache"], a["v_cache"], a["slot_mapping"],
                  kv_layout=kv_layout, **kw)

    return run_local(op, run, args, cands, " Tokens cannot be sharded: slot_mapping holds global slots of a page "
                     "pool shared by every token." + (" Per-head frequency rows cannot be head-sharded yet."
                                                      if len(cands) == 1 else ""))


def kv_compact(fn, k_cache, v_cache, cache_seqlens, src, counts, *, block_table=None, kv_layout="NHD", **kw):
    """posattn.kv_compact on DTensors (``fn``: the public op, run on the local shards)."""
    op = "posattn.kv_compact"
    ch = 2 if kv_layout == "NHD" else 1
    args = dict(k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, src=src, counts=counts,
                block_table=block_table)
    rep = {n: R for n in args}
    cands = [("replicated", rep, []), ("heads", dict(rep, k_cache=Shard(ch), v_cache=Shard(ch)), [])]
    if block_table is None:
        cands.append(("batch (contiguous cache)", dict(k_cache=Shard(0), v_cache=Shard(0), cache_seqlens=Shard(0),
                                                       src=Shard(0), counts=Shard(0)), []))

    def run(**a):
        return fn(a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), a.pop("src"), a.pop("counts"),
                  **a, kv_layout=kv_layout, **kw)

    return run_local(op, run, args, cands, " A paged cache (block_table) is one page pool shared by the batch: "
                     "shard it on heads.")

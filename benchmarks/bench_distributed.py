"""Context-parallel anchor attention: the ring's communication against its compute.

Two parts:

  --model    (no device needed) for the four layouts of bench_anchor_attention.py (65536 tokens,
             bf16, head_dim 128, 32 query / 8 key heads) over W ranks (default 8, zigzag): per
             ring step, the bytes each rank sends and receives, the unmasked (q, k) pairs of its
             block, and that block's compute time taken from the measured single-GPU kernel
             (benchmarks/results/h200/anchor_attention_sweep.jsonl: time per unmasked pair =
             kernel time / pairs of the layout), against the transfer time over a link of
             --link-gbs GB/s per direction (NVLink on an H200: 450). Prints one JSON line per layout.

  --overlap  (CPU, default) 2 gloo ranks run posattn.distributed.anchor_attention forward +
             backward; step_ms (the call, median of --reps after a barrier) against compute_ms, the
             same rank's block computations alone (the blocks of its plan, no communication);
             the two alternate rep by rep, so that a changing machine load affects both alike.
             overlap_ok: step_ms <= 1.2 * compute_ms on every rank.

    python benchmarks/bench_distributed.py --model [--world 8] [--shard zigzag|contiguous|zigzag_doc]
    python benchmarks/bench_distributed.py --overlap [--tokens 4096] [--reps 5] [--engine torch|kernel]

  --blocks   (CPU, one thread, no process group) each rank's block products of the --overlap step
             (own block, anchors, remote blocks; forward merges and backward): the torch blocks of
             posattn/distributed/_local.py (block_forward / block_backward, the oracle) against the
             C++ kernel's rectangles (rect_forward / rect_backward: what the ring runs on CPU),
             interleaved A/B (median of --reps), with the largest difference of their results.

    python benchmarks/bench_distributed.py --blocks [--tokens 2048] [--shard zigzag]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SWEEP = os.path.join(ROOT, "benchmarks", "results", "h200", "anchor_attention_sweep.jsonl")


# ---------------------------------------------------------------------------
# the paper model


def _pairs(q_ranges, k_ranges, cs, cr, na):
    """Unmasked causal (q, k) pairs between query ranges and key ranges, anchor keys excluded
    (they are the replicated block), counted per document in closed form."""
    import bisect

    total = 0
    for a, b in q_ranges:
        for c, d in k_ranges:
            i0 = max(0, bisect.bisect_right(cs, min(a, c)) - 1)
            while i0 < len(cs) - 1 and cs[i0] < max(b, d):
                ds, de = cs[i0], cs[i0 + 1]
                r0 = cr[bisect.bisect_right(cr, ds) - 1]
                qa, qb = max(a, ds), min(b, de)
                kc, kd = max(c, ds, r0 + na), min(d, de)
                if qa < qb and kc < kd:
                    # sum over queries i in [qa, qb) of |{j in [kc, kd): j <= i}|
                    full = max(qa, kd - 1)                   # from here on every key counts
                    lo, hi = max(qa, kc), min(qb, full)      # the ramp: i - kc + 1 keys
                    ramp = (hi - lo) * (lo - kc + 1 + hi - kc) // 2 if hi > lo else 0
                    total += ramp + max(0, qb - full) * (kd - kc)
                i0 += 1
    return total


def anchor_pairs(q_ranges, cs, cr, na):
    """Pairs of the replicated anchor block: each query sees its row's anchors (<= itself)."""
    import bisect

    total = 0
    for a, b in q_ranges:
        for i in range(a, b):
            r0 = cr[bisect.bisect_right(cr, i) - 1]
            total += max(0, min(na, i - r0 + 1))
    return total


def model(world: int, link_gbs: float, shard: str = "zigzag") -> list[dict]:
    from benchmarks.bench_anchor_attention import LAYOUTS, allowed_pairs, make_layout
    from posattn.distributed import plan_ring

    measured = {}
    if os.path.exists(SWEEP):
        for line in open(SWEEP):
            d = json.loads(line)
            if d.get("bench") == "anchor_attention":
                measured[(d["row_len"], d["docs_per_row"])] = d
    HK, D, BYTES = 8, 128, 2
    out = []
    for row_len, n_rows, n_docs in LAYOUTS:
        cu, rows = make_layout(row_len, n_rows, n_docs)
        cs, cr = cu.tolist(), rows.tolist()
        T = cs[-1]
        plan = plan_ring(cu, rows, 1, True, None, world, shard)
        m = measured.get((row_len, n_docs))
        pairs_all = allowed_pairs(cu, rows, 1)
        fwd_pair_us = m["fwd_ms"]["posattn"] * 1e3 / pairs_all if m else None
        bwd_ms = (m["step_ms"]["posattn"] - m["fwd_ms"]["posattn"] - m["mask_ms"]["posattn"]) if m else None
        bwd_pair_us = bwd_ms * 1e3 / pairs_all if m else None
        kv_bytes = [plan.sizes[r] * 2 * HK * D * BYTES for r in range(world)]
        # comp[s][r]: pairs rank r computes at step s (step 0: its own block and the anchors)
        comp = [[_pairs(plan.ranges[r], plan.ranges[r], cs, cr, 1) + anchor_pairs(plan.ranges[r], cs, cr, 1)
                 for r in range(world)]]
        recv = [[False] * world]
        for s in range(1, world):
            recv.append([plan.visible[r][(r - s) % world] for r in range(world)])
            comp.append([_pairs(plan.ranges[r], plan.ranges[(r - s) % world], cs, cr, 1) if recv[s][r] else 0
                         for r in range(world)])
        t_fwd = max(kv_bytes) / (link_gbs * 1e9) * 1e6                  # us: one K/V block
        t_bwd = 3 * t_fwd                                                # K/V again + fp32 dK/dV back
        rows_out = []
        for s in range(world):
            row = {"step": s, "blocks_received": sum(recv[s]), "MB_moved": round(sum(recv[s]) * max(kv_bytes) / 1e6, 1),
                   "pairs_max": max(comp[s]), "pairs_min_of_receivers":
                   min((comp[s][r] for r in range(world) if recv[s][r]), default=None)}
            if fwd_pair_us:
                row["fwd_us_max"] = round(max(comp[s]) * fwd_pair_us, 1)
                row["bwd_us_max"] = round(max(comp[s]) * bwd_pair_us, 1)
            rows_out.append(row)
        est = {}
        if fwd_pair_us:
            # a rank posts every transfer up to its next received block before computing a block:
            # step s's transfer to rank r runs behind r's previous computed block (the last step
            # before s at which r received, or step 0) -- and behind the sender's compute then
            def prev_block(r, s):
                return max([t for t in range(1, s) if recv[t][r]] or [0])

            for kind, per, t_link in (("fwd", fwd_pair_us, t_fwd), ("bwd", bwd_pair_us, t_bwd)):
                per_rank, exposed = [], []
                for r in range(world):
                    c = sum(comp[s][r] for s in range(world)) * per
                    e = sum(max(0.0, t_link - comp[prev_block(r, s)][r] * per)
                            for s in range(1, world) if recv[s][r])
                    per_rank.append(c)
                    exposed.append(e)
                est[f"{kind}_compute_us_max"] = round(max(per_rank), 1)
                est[f"{kind}_exposed_transfer_us_max"] = round(max(exposed), 1)
                est[f"{kind}_step_us_est"] = round(max(c + e for c, e in zip(per_rank, exposed)), 1)
                est[f"{kind}_single_gpu_us"] = round(pairs_all * per, 1)
        layout = {"row_len": row_len, "rows": n_rows, "docs_per_row": n_docs}
        out.append({"bench": "distributed_model", "layout": layout,
                    "world": world, "shard": shard, "tokens": T, "kv_block_MB": round(max(kv_bytes) / 1e6, 2),
                    "fwd_transfer_us": round(t_fwd, 1), "bwd_transfer_us": round(t_bwd, 1),
                    "fwd_us_per_Mpair": round(fwd_pair_us * 1e6, 3) if fwd_pair_us else None,
                    "bwd_us_per_Mpair": round(bwd_pair_us * 1e6, 3) if bwd_pair_us else None,
                    "blocks_computed": sum(plan.blocks(r) for r in range(world)), "blocks_possible": world * world,
                    **est, "steps": rows_out})
    return out


# ---------------------------------------------------------------------------
# the CPU overlap measurement


def _overlap_rank(rank, world, tokens, reps, out_file, engine="torch"):
    import torch.distributed as dist

    from posattn import distributed as D
    from posattn.distributed import _local as L
    from posattn.distributed import ring as R
    from posattn.distributed.plan import plan_ring

    HQ, HK, Dh = 8, 2, 64
    cu = torch.tensor([0, tokens], dtype=torch.int32)         # one document across both ranks: every block seen
    rows = torch.tensor([0, tokens], dtype=torch.int32)
    g = torch.Generator().manual_seed(rank)
    Tl = D.shard_sizes(tokens, world, "zigzag")[rank]
    q, k, v = (torch.randn(Tl, h, Dh, generator=g, requires_grad=True) for h in (HQ, HK, HK))
    dout = torch.randn(Tl, HQ, Dh, generator=g)

    def step():
        out = D.anchor_attention(q, k, v, cu, cu_rows=rows, num_anchors=1, shard="zigzag", block_engine=engine)
        out.backward(dout)

    plan = plan_ring(cu, rows, 1, True, None, world, "zigzag")
    meta = R._Meta(plan, cu, rows, "cpu")
    ring = R._Ring(plan, meta, None, rank, 1, True, None, Dh ** -0.5, kernel=engine == "kernel")
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    akv = torch.stack((kd, vd), 1)[: plan.anchor_index.numel()]   # the anchor block's shape (1 token)

    def compute():
        """The rank's blocks of the same step, no communication: own, anchors, each visible remote
        block (same shapes: zigzag shards are equal), forward merges, then the backward's blocks,
        on the engine the step uses (ring.fwd / ring.bwd)."""
        srcs = [rank] + [(rank - s) % world for s in range(1, world) if plan.visible[rank][(rank - s) % world]]
        o, l = ring.fwd(qd, kd, vd, rank)
        o, l = L.merge(o, l, *ring.fwd(qd, akv[:, 0], akv[:, 1], None))
        for src in srcs[1:]:
            o, l = L.merge(o, l, *ring.fwd(qd, kd, vd, src))
        delta = (o * dout).sum(-1).transpose(0, 1)
        ring.bwd(dout, qd, akv[:, 0], akv[:, 1], None, l, delta)
        for src in srcs:
            ring.bwd(dout, qd, kd, vd, src, l, delta)

    # step and compute alternate rep by rep (after one warm-up each), so that a change in the load
    # that other work puts on the machine affects both alike; medians of --reps
    ts = {step: [], compute: []}
    for fn in (step, compute):
        fn()
    for _ in range(reps):
        for fn in (step, compute):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts[fn].append((time.perf_counter() - t0) * 1e3)
    step_ms, compute_ms = statistics.median(ts[step]), statistics.median(ts[compute])
    res = {"rank": rank, "step_ms": round(step_ms, 2), "compute_ms": round(compute_ms, 2),
           "ratio": round(step_ms / compute_ms, 3), "blocks": plan.blocks(rank)}
    got = [None] * world
    dist.all_gather_object(got, res)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(got, f)


def _entry(rank, world, init_file, args):
    import torch.distributed as dist

    torch.set_num_threads(1)                      # one core per rank (2 ranks on this 2-core machine)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _overlap_rank(rank, world, *args)
    finally:
        dist.destroy_process_group()


def overlap(tokens: int = 4096, reps: int = 5, world: int = 2, engine: str = "torch") -> dict:
    import torch.multiprocessing as mp

    d = tempfile.mkdtemp(prefix="posattn-overlap-")
    init_file, out_file = os.path.join(d, "store"), os.path.join(d, "out.json")
    mp.spawn(_entry, args=(world, init_file, (tokens, reps, out_file, engine)), nprocs=world, join=True)
    ranks = json.load(open(out_file))
    return {"bench": "distributed_overlap", "backend": "gloo", "world": world, "tokens": tokens,
            "heads_q": 8, "heads_k": 2, "head_dim": 64, "dtype": "float32", "threads_per_rank": 1,
            "block_engine": engine,
            "ranks": ranks, "worst_ratio": max(r["ratio"] for r in ranks),
            "overlap_ok": all(r["ratio"] <= 1.2 for r in ranks)}


def blocks(tokens: int, reps: int, shard: str, world: int = 2) -> list[dict]:
    from posattn.distributed import _local as L
    from posattn.distributed import ring as R
    from posattn.distributed.plan import plan_ring

    torch.set_num_threads(1)
    HQ, HK, Dh = 8, 2, 64
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    plan = plan_ring(cu, cu, 1, True, None, world, shard)
    meta = R._Meta(plan, cu, cu, "cpu")

    def run(kernel, rank, q, k, v, dout, akv, ring):
        def fwd(kk, vv, src):
            if kernel:
                return L.rect_forward(q, kk, vv, meta.rect(ring.spec, rank, src), ring.spec, ring.scale,
                                      src is not None)
            return L.block_forward(q, kk, vv, ring.mask(src), ring.scale)

        def bwd(kk, vv, src, l, delta):
            if kernel:
                return L.rect_backward(dout, q, kk, vv, meta.rect(ring.spec, rank, src), ring.spec, l, delta,
                                       ring.scale, src is not None)
            return L.block_backward(dout, q, kk, vv, ring.mask(src), l, delta, ring.scale)

        srcs = [rank] + [(rank - s) % world for s in range(1, world) if plan.visible[rank][(rank - s) % world]]
        o, l = fwd(k, v, rank)
        o, l = L.merge(o, l, *fwd(akv[:, 0], akv[:, 1], None))
        for s in srcs[1:]:
            o, l = L.merge(o, l, *fwd(k, v, s))
        delta = (o * dout).sum(-1).transpose(0, 1)
        gs = [bwd(akv[:, 0], akv[:, 1], None, l, delta)]
        gs += [bwd(k, v, s, l, delta) for s in srcs]
        return [o] + [t for g in gs for t in g]

    out = []
    for rank in range(world):
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(plan.sizes[rank], h, Dh, generator=g) for h in (HQ, HK, HK))
        dout = torch.randn(plan.sizes[rank], HQ, Dh, generator=g)
        ring = R._Ring(plan, meta, None, rank, 1, True, None, Dh ** -0.5)
        akv = torch.stack((k, v), 1)[: plan.anchor_index.numel()]
        diff = max((a - b).abs().max().item() for a, b in zip(run(False, rank, q, k, v, dout, akv, ring),
                                                               run(True, rank, q, k, v, dout, akv, ring)))
        ts = {"torch": [], "kernel": []}
        for _ in range(reps):
            for name in ("torch", "kernel"):
                t0 = time.perf_counter()
                run(name == "kernel", rank, q, k, v, dout, akv, ring)
                ts[name].append((time.perf_counter() - t0) * 1e3)
        t_ms, k_ms = statistics.median(ts["torch"]), statistics.median(ts["kernel"])
        out.append({"bench": "distributed_blocks", "tokens": tokens, "shard": shard, "rank": rank,
                    "threads": 1, "torch_ms": round(t_ms, 1), "kernel_ms": round(k_ms, 1),
                    "speedup": round(t_ms / k_ms, 2), "max_abs_diff": diff})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--blocks", action="store_true")
    ap.add_argument("--world", type=int, default=8, help="--model: ranks")
    ap.add_argument("--link-gbs", type=float, default=450.0, help="--model: GB/s per direction")
    ap.add_argument("--shard", default="zigzag", choices=("zigzag", "contiguous", "zigzag_doc"),
                    help="--model, --blocks: how the step is sharded")
    ap.add_argument("--tokens", type=int, default=4096, help="--overlap: tokens of the step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--engine", default="torch", choices=("torch", "kernel"),
                    help="--overlap: anchor_attention's block_engine")
    args = ap.parse_args(argv)
    if args.model:
        for r in model(args.world, args.link_gbs, args.shard):
            print(json.dumps(r))
    if args.blocks:
        for r in blocks(args.tokens, args.reps, args.shard):
            print(json.dumps(r))
    if args.overlap or not (args.model or args.blocks):
        print(json.dumps(overlap(args.tokens, args.reps, engine=args.engine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

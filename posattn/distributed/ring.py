"""Context-parallel anchor attention: K/V blocks exchanged by torch.distributed P2P, merged by LSE.

Each rank holds its shard of the step's packed tokens (posattn.distributed.sharding). The
schedule is the ring's rotation: at step s = 1..W-1, rank r sends its K/V to rank r+s and
receives rank r-s's (one shard per step, as a ring; sent directly from the owner, so a block
nobody downstream needs is not relayed, and a block its receiver cannot see is not sent at
all). Before a block is computed, every transfer up to the rank's next received block is
posted (overlap: skipped steps do not leave the next transfer without compute to hide
behind; at most two receive buffers are alive). The step's
anchor tokens are gathered once onto every rank (one all_gather) and attended as one extra
block; the ring hides anchor keys so nothing is counted twice.

Backward: the K/V blocks travel the same schedule again; each receiver computes the block's
dK/dV and sends them back to the owner (P2P, fp32), overlapped like the forward; the anchor
blocks' dK/dV are summed by one all_reduce and added by each owner.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from posattn.distributed import _local as L
from posattn.distributed.plan import RingPlan

_FWD, _BWD_KV, _BWD_DKV = 0, 1 << 12, 2 << 12       # tag bases, so the three exchanges never match


class _Meta:
    """Token metadata of the step on one rank (int64 [T]: document id, row start) and the rank's
    global indices per rank, built once per call."""

    def __init__(self, plan: RingPlan, cu_seqlens, cu_rows, device):
        T = plan.T
        cs = cu_seqlens.to(device=device, dtype=torch.int64)
        tok = torch.arange(T, dtype=torch.int64, device=device)
        self.doc = torch.searchsorted(cs, tok, right=True) - 1
        cr = cu_rows.to(device=device, dtype=torch.int64)
        self.row_start = cr[torch.searchsorted(cr, tok, right=True) - 1]
        self.index = [torch.cat([torch.arange(s, e, dtype=torch.int64, device=device) for s, e in rg])
                      for rg in plan.ranges]
        self.anchor_index = plan.anchor_index.to(device)
        self.cu = (cs, cr)
        self._tokens = None
        self._rects: dict = {}       # (rank, src, spec) -> the kernel's lists of that block (every layer's)

    def rect(self, spec, rank: int, src: int | None):
        """The C++ kernel's (lists, iq, ik) for rank's queries against rank src's keys (None: the anchors)."""
        key = (rank, src, spec)
        hit = self._rects.get(key)
        if hit is None:
            from posattn.attention.masks import step_tokens

            if self._tokens is None:
                self._tokens = step_tokens(self.cu[0], self.cu[1], self.doc.shape[0])
            ik = self.anchor_index if src is None else self.index[src]
            hit = self._rects[key] = L.rect_lists(spec, self._tokens, self.index[rank], ik, src is not None)
        return hit


class _Ring:
    def __init__(self, plan, meta, group, rank, num_anchors, causal, window, scale, kernel: bool = False):
        self.plan, self.meta, self.group, self.rank = plan, meta, group, rank
        self.kernel = kernel           # blocks on the C++ kernel (anchor_attention's block_engine="kernel")
        self.na, self.causal, self.window, self.scale = num_anchors, causal, window, scale
        from posattn.attention.masks import MaskSpec

        self.spec = MaskSpec(causal=causal, num_anchors=num_anchors, window=window)

    def fwd(self, q, k, v, src: int | None):
        """(out, lse) of the rank's queries against rank src's keys k, v (None: the anchor block):
        the C++ kernel's rectangle (self.kernel), else the torch block."""
        if self.kernel:
            return L.rect_forward(q, k, v, self.meta.rect(self.spec, self.rank, src), self.spec, self.scale,
                                  src is not None)
        return L.block_forward(q, k, v, self.mask(src), self.scale)

    def bwd(self, do, q, k, v, src: int | None, lse, delta):
        """(dq, dk, dv) of that block given the merged lse and delta."""
        if self.kernel:
            return L.rect_backward(do, q, k, v, self.meta.rect(self.spec, self.rank, src), self.spec, lse, delta,
                                   self.scale, src is not None)
        return L.block_backward(do, q, k, v, self.mask(src), lse, delta, self.scale)

    def peer(self, r):
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def mask(self, src: int | None):
        """mask_of(a, b): the mask of the rank's queries a..b against rank src's keys (None: the
        anchor block), built per query tile."""
        m = self.meta
        ik = m.anchor_index if src is None else m.index[src]
        iq = m.index[self.rank]
        return lambda a, b: L.block_mask(iq[a:b], ik, m.doc, m.row_start, self.na, self.causal, self.window,
                                         anchor_keys=src is None)

    def post_kv(self, step: int, kv: torch.Tensor, tag: int):
        """Post step's send of kv [T_l, 2, Hk, D] and receive; returns (works, recv buffer, src)."""
        W, r, plan = self.plan.world_size, self.rank, self.plan
        dst, src = (r + step) % W, (r - step) % W
        works, buf = [], None
        if plan.visible[dst][r]:
            works.append(dist.isend(kv, self.peer(dst), group=self.group, tag=tag + step))
        if plan.visible[r][src]:
            buf = kv.new_empty((plan.sizes[src],) + tuple(kv.shape[1:]))
            works.append(dist.irecv(buf, self.peer(src), group=self.group, tag=tag + step))
        return works, buf, src

    def gather_anchors(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [T_l, 2, Hk, D] -> the step's anchor K/V [NA, 2, Hk, D] in ascending token order."""
        plan = self.plan
        counts = [x.numel() for x in plan.anchor_local]
        pad = max(counts)
        mine = kv.new_zeros((pad,) + tuple(kv.shape[1:]))
        mine[:counts[self.rank]] = kv[plan.anchor_local[self.rank].to(kv.device)]
        bufs = [torch.empty_like(mine) for _ in counts]
        dist.all_gather(bufs, mine, group=self.group)
        cat = torch.cat([b[:c] for b, c in zip(bufs, counts)])
        return cat[plan.anchor_from.to(kv.device)]


class _Posts:
    """Posts the K/V exchanges of the steps ahead: up to the rank's next received block."""

    def __init__(self, ring: _Ring, kv: torch.Tensor, tag: int):
        self.ring, self.kv, self.tag, self.next, self.posted = ring, kv, tag, 1, {}
        plan, r, W = ring.plan, ring.rank, ring.plan.world_size
        self.W = W
        self.recv_steps = [s for s in range(1, W) if plan.visible[r][(r - s) % W]]

    def ahead_of(self, step: int) -> None:
        upto = next((s for s in self.recv_steps if s > step), self.W - 1)
        while self.next <= upto:
            self.posted[self.next] = self.ring.post_kv(self.next, self.kv, self.tag)
            self.next += 1

    def take(self, step: int):
        """Wait for step's exchange; returns (recv buffer or None, src)."""
        works, buf, src = self.posted.pop(step)
        for w in works:
            w.wait()
        return buf, src


def forward(ring: _Ring, q, k, v):
    """Returns (out [T_l, Hq, D] compute dtype, lse [Hq, T_l], anchor kv or None)."""
    plan, r = ring.plan, ring.rank
    kv = torch.stack((k, v), 1).contiguous()                       # [T_l, 2, Hk, D]
    akv = ring.gather_anchors(kv) if plan.anchor_index.numel() else None
    posts = _Posts(ring, kv, _FWD)
    posts.ahead_of(0)
    out, lse = ring.fwd(q, k, v, r)
    if akv is not None:
        out, lse = L.merge(out, lse, *ring.fwd(q, akv[:, 0], akv[:, 1], None))
    for step in range(1, plan.world_size):
        buf, src = posts.take(step)
        posts.ahead_of(step)
        if buf is not None:
            out, lse = L.merge(out, lse, *ring.fwd(q, buf[:, 0], buf[:, 1], src))
    return out, lse, akv


def backward(ring: _Ring, dout, dlse, q, k, v, out, lse, akv):
    """Gradients (dq, dk, dv) of the rank's shard, in the compute dtype."""
    plan, r, W = ring.plan, ring.rank, ring.plan.world_size
    ct = L.compute_dtype(q.dtype)
    do = dout.to(ct)
    delta = (out.to(ct) * do).sum(-1).transpose(0, 1)               # [Hq, T_l]
    if dlse is not None:
        delta = delta - dlse.to(ct)
    kv = torch.stack((k, v), 1).contiguous()
    posts = _Posts(ring, kv, _BWD_KV)
    posts.ahead_of(0)
    dq, dk, dv = ring.bwd(do, q, k, v, r, lse, delta)
    if akv is not None:
        dqa, dka, dva = ring.bwd(do, q, akv[:, 0], akv[:, 1], None, lse, delta)
        dq += dqa
    sends, recvs = [], []                       # dK/dV going back to their owners; (work, buffer) coming in
    for step in range(1, W):
        buf, src = posts.take(step)
        posts.ahead_of(step)
        dst = (r + step) % W
        if plan.visible[dst][r]:                 # rank dst computes our block: its dK/dV come back
            rbuf = torch.empty((plan.sizes[r], 2) + tuple(k.shape[1:]), dtype=ct, device=k.device)
            recvs.append((dist.irecv(rbuf, ring.peer(dst), group=ring.group, tag=_BWD_DKV + step), rbuf))
        if buf is not None:
            dqb, dkb, dvb = ring.bwd(do, q, buf[:, 0], buf[:, 1], src, lse, delta)
            dq += dqb
            part = torch.stack((dkb, dvb), 1).contiguous()
            sends.append((dist.isend(part, ring.peer(src), group=ring.group, tag=_BWD_DKV + step), part))
        while len(recvs) > 1:                   # fold in what has surely arrived while we computed
            w, rbuf = recvs.pop(0)
            w.wait()
            dk += rbuf[:, 0]
            dv += rbuf[:, 1]
    for w, rbuf in recvs:
        w.wait()
        dk += rbuf[:, 0]
        dv += rbuf[:, 1]
    for w, _ in sends:
        w.wait()
    if akv is not None:
        dkva = torch.stack((dka, dva), 1).contiguous()
        if W > 1:
            dist.all_reduce(dkva, group=ring.group)
        mine = plan.anchor_local[r].to(k.device)
        inv = torch.empty_like(plan.anchor_from)
        inv[plan.anchor_from] = torch.arange(plan.anchor_from.numel())
        off = sum(x.numel() for x in plan.anchor_local[:r])
        rows = dkva[inv[off:off + mine.numel()].to(k.device)]     # my anchors, in my local order
        dk.index_add_(0, mine, rows[:, 0])
        dv.index_add_(0, mine, rows[:, 1])
    return dq, dk, dv


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring):
        out, lse, akv = forward(ring, q, k, v)
        out = out.to(q.dtype)
        lse = lse.to(torch.float32)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse, akv if akv is not None else torch.empty(0))
        ctx.has_anchors = akv is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, akv = ctx.saved_tensors
        dq, dk, dv = backward(ctx.ring, dout, dlse, q, k, v, out, lse, akv if ctx.has_anchors else None)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None

"""DTensor cases run on every rank (see test_dtensor.py): head-, sequence- and batch-sharded
posattn ops equal the local ops on the full tensors, values and gradients; unsupported
placements raise an error naming them."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

import posattn
from posattn import distributed as D
from tests._tol import assert_close

R = Replicate()


def _grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    return torch.autograd.grad(outs, leaves, cot), cot


def _check(mesh, fn, full_inputs, placements, seed, what, grad_of=(0, 1)):
    """fn(*inputs) on plain tensors and on DTensors distributed with ``placements``: equal outputs and
    gradients (the cotangents are the same full tensors, distributed like the outputs)."""
    plain = [x.clone().requires_grad_(i in grad_of) for i, x in enumerate(full_inputs)]
    outs = [o for o in fn(*plain) if o is not None]
    grads, cot = _grads(outs, [plain[i] for i in grad_of], seed)
    dts = [x if p is None else distribute_tensor(x, mesh, [p]) for x, p in zip(full_inputs, placements)]
    dts = [x.requires_grad_(True) if i in grad_of else x for i, x in enumerate(dts)]
    douts = [o for o in fn(*dts) if o is not None]
    for a, b in zip(douts, outs):
        assert_close(a.full_tensor(), b.detach(), msg=f"{what}: output")
    dcot = [distribute_tensor(c, mesh, list(o.placements)) for c, o in zip(cot, douts)]
    dgrads = torch.autograd.grad(douts, [dts[i] for i in grad_of], dcot)
    for a, b, i in zip(dgrads, grads, grad_of):
        if dts[i].placements != (R,):        # a replicated input's gradient may come back sliced
            assert a.placements == dts[i].placements, (what, i, a.placements, dts[i].placements)
        assert_close(a.full_tensor(), b, msg=f"{what}: gradient")
    with torch.no_grad():                     # the no-grad path: through the op too, never a raw pointer
        for a, b in zip([o for o in fn(*[x.detach() for x in dts]) if o is not None], outs):
            assert_close(a.full_tensor(), b.detach(), msg=f"{what}: no-grad output")
    return douts


def _raises(fn, *words):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return
    raise AssertionError(f"no error; expected one naming {words}")


def rope_cases(rank, world):
    mesh = DeviceMesh("cpu", list(range(world)))
    torch.manual_seed(0)
    B, S, HQ, HK, Dh = 2, 7, 4, 2, 80
    spec = posattn.RopeSpec(Dh, rotary_dim=48)
    q, k = torch.randn(B, S, HQ, Dh), torch.randn(B, S, HK, Dh)
    pos = torch.randint(0, 9000, (S,))
    f = lambda q_, k_, p_: posattn.apply_rope(q_, k_, p_, spec, backend="cpu")  # noqa: E731
    for qp, pp, what in ((Shard(2), R, "heads"), (Shard(1), Shard(0), "sequence, sharded global positions"),
                         (Shard(1), R, "sequence, replicated positions"), (Shard(0), R, "batch"), (R, R, "replicated")):
        out = _check(mesh, f, [q, k, pos], [qp, qp, pp], 1, f"apply_rope {what}")
        assert out[0].placements == (qp,), (what, out[0].placements)
    # packed thd, sequence-sharded, with the global positions of the packed documents
    cu = torch.tensor([0, 3, 9, 10, 13], dtype=torch.int32)
    qt, kt = torch.randn(13, 3, 96), torch.randn(13, 1, 96)
    pt = D.shard_positions(None, 1, 0, cu_seqlens=cu)
    spec96 = posattn.RopeSpec(96)
    ft = lambda q_, k_, p_: posattn.apply_rope(q_, k_, p_, spec96, layout="thd", backend="cpu")  # noqa: E731
    _check(mesh, ft, [qt, kt, pt], [Shard(0), Shard(0), Shard(0)], 2, "apply_rope thd sequence")
    _check(mesh, ft, [qt, kt, pt], [Shard(1), R, R], 3, "apply_rope thd heads of q, k (1 head) replicated")
    # unsupported: head_dim sharded, q and k sharded on different dims, positions sharded but q not
    qd, kd = distribute_tensor(q, mesh, [Shard(3)]), distribute_tensor(k, mesh, [Shard(3)])
    _raises(lambda: f(qd, kd, pos), "posattn::rope", "unsupported DTensor placements", "q S(3)")
    _raises(lambda: f(distribute_tensor(q, mesh, [Shard(1)]), distribute_tensor(k, mesh, [Shard(2)]), pos),
            "q S(1), k S(2)")
    _raises(lambda: f(distribute_tensor(q, mesh, [Shard(2)]), distribute_tensor(k, mesh, [Shard(2)]),
                      distribute_tensor(pos, mesh, [Shard(0)])), "q S(2), k S(2), positions S(2)")
    # replicated q and k with sequence-sharded positions: q and k are sliced locally, nothing moves
    _check(mesh, f, [q, k, pos], [R, R, Shard(0)], 10, "apply_rope replicated q, k; sharded positions")

    # apply_rope_angles: per-head angles sharded with the heads; sequence-sharded angles
    ang = torch.randn(B, S, HK, 24)
    fa = lambda q_, k_, a_: posattn.apply_rope_angles(q_, k_, a_, backend="cpu")  # noqa: E731
    _check(mesh, fa, [q, k, ang], [Shard(2), Shard(2), Shard(2)], 4, "apply_rope_angles heads")
    _check(mesh, fa, [q, k, ang], [Shard(1), Shard(1), Shard(1)], 5, "apply_rope_angles sequence")

    # apply_rope_cos_sin: per-token tables sharded with the sequence; a cache indexed by sharded positions
    cos, sin = torch.randn(S, 40), torch.randn(S, 40)
    fc = lambda q_, k_, c_, s_: posattn.apply_rope_cos_sin(q_, k_, c_, s_, backend="cpu")  # noqa: E731
    _check(mesh, fc, [q, k, cos, sin], [Shard(2), Shard(2), R, R], 6, "apply_rope_cos_sin heads")
    _check(mesh, fc, [q, k, cos, sin], [Shard(1), Shard(1), Shard(0), Shard(0)], 7, "apply_rope_cos_sin sequence")
    cache, cpos = torch.randn(32, 80), torch.randint(0, 32, (S,))
    fcc = lambda q_, k_, c_, p_: posattn.apply_rope_cos_sin(q_, k_, cos_sin_cache=c_, positions=p_,  # noqa: E731
                                                             backend="cpu")
    _check(mesh, fcc, [q, k, cache, cpos], [Shard(1), Shard(1), R, Shard(0)], 8, "apply_rope_cos_sin cache sequence")


def attention_cases(rank, world):
    """anchor_attention on head-sharded DTensors with plain boundaries and positions, as a user
    calls it (no implicit_replication): forward and backward equal the local op, with the lse
    returned (and given a gradient) and without it (autograd's gradient of the unused lse)."""
    mesh = DeviceMesh("cpu", list(range(world)))
    torch.manual_seed(1)
    T, HQ, HK, Dh = 13, 4, 2, 16
    q, k, v = torch.randn(T, HQ, Dh), torch.randn(T, HK, Dh), torch.randn(T, HK, Dh)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    rows = torch.tensor([0, 6, 13], dtype=torch.int32)
    pos = D.shard_positions(None, 1, 0, cu_seqlens=cu)
    spec = posattn.RopeSpec(Dh)

    def f(q_, k_, v_, lse=True, rope=True):
        return posattn.anchor_attention(q_, k_, v_, cu, cu_rows=rows, num_anchors=2, window=4, return_lse=lse,
                                        rope=spec if rope else None, positions=pos if rope else None,
                                        backend="cpu")

    heads = [Shard(1), Shard(1), Shard(1)]
    out = _check(mesh, f, [q, k, v], heads, 9, "anchor_attention heads", grad_of=(0, 1, 2))
    assert out[0].placements == (Shard(1),) and out[1].placements == (Shard(0),)
    _check(mesh, lambda *x: (f(*x, lse=False),), [q, k, v], heads, 11, "anchor_attention heads, lse unused",
           grad_of=(0, 1, 2))
    _check(mesh, lambda *x: (f(*x, lse=False, rope=False),), [q, k, v], heads, 12,
           "anchor_attention heads, no rope", grad_of=(0, 1, 2))
    qs, ks, vs = (distribute_tensor(x, mesh, [Shard(0)]) for x in (q, k, v))
    _raises(lambda: f(qs, ks, vs), "posattn::anchor_attention", "q S(0)", "posattn.distributed.anchor_attention")
    q6, k3 = (distribute_tensor(torch.randn(T, h, Dh), mesh, [Shard(1)]) for h in (6, 3))
    _raises(lambda: f(q6, k3, k3), "k's (3) head counts divisible by 2")
    k1 = distribute_tensor(torch.randn(T, 1, Dh), mesh, [Shard(1)])
    _raises(lambda: f(q6, k1, k1), "shards fewer entries than the 2 ranks", "k dim 1 has 1")


def all_cases(rank, world):
    rope_cases(rank, world)
    attention_cases(rank, world)


def mesh_2d_cases(rank, world):
    """A 2 x 2 mesh (data x tensor parallel): batch or sequence on one mesh dimension, heads on the
    other; a head_dim shard on the second mesh dimension is refused, naming that dimension."""
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(2)
    B, S, HQ, HK, Dh = 2, 9, 4, 2, 32
    spec = posattn.RopeSpec(Dh)
    q, k, pos = torch.randn(B, S, HQ, Dh), torch.randn(B, S, HK, Dh), torch.randint(0, 500, (B, S))
    f = lambda q_, k_, p_: posattn.apply_rope(q_, k_, p_, spec, backend="cpu")  # noqa: E731
    for qp, pp, what in (([Shard(0), Shard(2)], [Shard(0), R], "batch x heads"),
                         ([Shard(1), Shard(2)], [Shard(1), R], "sequence x heads")):
        plain = [x.clone().requires_grad_(i < 2) for i, x in enumerate((q, k, pos))]
        outs = f(*plain)
        cot = [torch.randn(o.shape) for o in outs]
        grads = torch.autograd.grad(outs, plain[:2], cot)
        dts = [distribute_tensor(x, mesh, p) for x, p in zip((q, k, pos), (qp, qp, pp))]
        dts = [x.requires_grad_(True) for x in dts[:2]] + dts[2:]
        douts = f(*dts)
        dg = torch.autograd.grad(douts, dts[:2], [distribute_tensor(c, mesh, list(o.placements))
                                                  for c, o in zip(cot, douts)])
        for a, b in zip(douts, outs):
            assert a.placements == tuple(qp), what
            assert_close(a.full_tensor(), b.detach(), msg=what)
        for a, b in zip(dg, grads):
            assert_close(a.full_tensor(), b, msg=f"{what}: gradient")
    qd, kd = (distribute_tensor(x, mesh, [Shard(0), Shard(3)]) for x in (q, k))
    _raises(lambda: f(qd, kd, pos), "unsupported DTensor placements on mesh dimension 1", "q S(3)")

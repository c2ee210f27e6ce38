"""The ring's blocks on the C++ kernel (a rectangle of the step: queries and keys at global token
indices, posattn.attention.masks.lower_rect + kernels.cpu_attention.rect_forward/backward) equal
the torch block of posattn/distributed/_local.py in fp64 (the oracle) for random packings, rows,
anchors, windows, causal or not, all three shard schemes, the anchor block, odd sizes and GQA."""
import random

import pytest
import torch

from posattn import distributed as D
from posattn.attention.masks import MaskSpec, step_tokens
from posattn.distributed import _local as L
from posattn.distributed import ring as R
from posattn.kernels import cpu as _cpu
from tests.attention.layouts import random_layout

pytestmark = pytest.mark.skipif(_cpu._C is None, reason="posattn._C not built")


def _close(a, b, what):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), what           # the same rows see nothing (lse -inf)
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= 2e-5 * (1 + b[fin].abs().max().item() if fin.any() else 1), (what, err)


def _cases(seed):
    rng = random.Random(seed)
    for _ in range(6):
        T = rng.randint(7, 150)
        na = rng.choice([0, 1, 2])
        cu, rows = random_layout(rng, T, rng.randint(1, 3), na, max_docs=rng.randint(1, 8))
        spec = MaskSpec(causal=rng.random() < 0.6, num_anchors=na, window=rng.choice([None, 1, 5, 40]))
        W = rng.choice([2, 3, 4])
        shard = rng.choice(["zigzag", "contiguous", "zigzag_doc"])
        yield rng, T, cu, rows, spec, W, shard


@pytest.mark.parametrize("seed", range(5))
def test_rect_equals_the_torch_block(seed):
    g = torch.Generator().manual_seed(seed)
    for rng, T, cu, rows, spec, W, shard in _cases(seed):
        HQ, HK, D_ = rng.choice([(3, 1), (4, 2), (2, 2)]) + (rng.choice([16, 80]),)
        plan = D.plan_ring(cu, rows, spec.num_anchors, spec.causal, spec.window, W, shard)
        meta = R._Meta(plan, cu, rows, torch.device("cpu"))
        tokens = step_tokens(cu, rows, T)
        r = rng.randrange(W)
        iq = meta.index[r]
        # the rank's own block, every other rank's (visible or not) and the anchor block
        for src in list(range(W)) + [None]:
            ik = meta.anchor_index if src is None else meta.index[src]
            hide = src is not None
            Tq, Tk = iq.numel(), ik.numel()
            q, dout = torch.randn(Tq, HQ, D_, generator=g), torch.randn(Tq, HQ, D_, generator=g)
            k, v = torch.randn(Tk, HK, D_, generator=g), torch.randn(Tk, HK, D_, generator=g)
            scale = D_ ** -0.5

            def mask_of(a, b):
                return L.block_mask(iq[a:b], ik, meta.doc, meta.row_start, spec.num_anchors, spec.causal,
                                    spec.window, anchor_keys=src is None)

            r_out, r_lse = L.block_forward(q.double(), k.double(), v.double(), mask_of, scale)
            rect = L.rect_lists(spec, tokens, iq, ik, hide)
            out, lse = L.rect_forward(q, k, v, rect, spec, scale, hide)
            what = (T, cu.tolist(), rows.tolist(), spec, W, shard, r, src)
            _close(lse, r_lse, ("lse",) + what)
            _close(out, r_out, ("out",) + what)
            # backward with a merged lse / delta other than the block's own (as the ring passes them)
            lse_m = torch.logaddexp(r_lse, torch.randn(HQ, Tq, generator=g, dtype=torch.float64))
            delta = torch.randn(HQ, Tq, generator=g, dtype=torch.float64)
            ref = L.block_backward(dout.double(), q.double(), k.double(), v.double(), mask_of, lse_m, delta, scale)
            got = L.rect_backward(dout, q, k, v, rect, spec, lse_m.float(), delta.float(), scale, hide)
            for name, a, b in zip(("dq", "dk", "dv"), got, ref):
                _close(a, b, (name,) + what)


def test_rect_lists_skip_invisible_key_blocks():
    """Short documents: each query block visits only the key blocks of its own documents."""
    cu = torch.arange(0, 1025, 16, dtype=torch.int32)
    rows = torch.tensor([0, 1024], dtype=torch.int32)
    spec = MaskSpec(causal=True, num_anchors=0)
    iq, ik = torch.arange(512, 1024), torch.arange(0, 512)
    from posattn.attention.masks import lower_rect

    assert lower_rect(spec, step_tokens(cu, rows, 1024), iq, ik, 32, 64, True).nnz == 0
    lists = lower_rect(spec, step_tokens(cu, rows, 1024), iq, iq, 32, 64, True)
    assert lists.nnz == 512 // 32                 # one key block per query block (its own documents)


def test_rect_binding_rejects_bad_arguments():
    spec = MaskSpec(causal=True, num_anchors=0)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    idx = torch.arange(8)
    lists, iq, ik = L.rect_lists(spec, step_tokens(cu, cu, 8), idx, idx, True)
    q = torch.randn(8, 2, 16)
    ptrs = [q.data_ptr()] * 11 + [0, 0]
    args = (8, 2, 2, 16)
    tail = (0.25, 0, True, 0, 32, 64, q.data_ptr(), q.data_ptr(), 1)
    with pytest.raises(ValueError, match="rotary"):            # a rectangle takes rotated q and k
        _cpu._C.attention_forward_rect(*args, ptrs[:11] + [q.data_ptr()] * 2, *tail, 8, iq.data_ptr(),
                                       ik.data_ptr(), True)
    with pytest.raises(ValueError, match="Tk must be >= 0"):
        _cpu._C.attention_forward_rect(*args, ptrs, *tail, -1, iq.data_ptr(), ik.data_ptr(), True)
    with pytest.raises(ValueError, match="needs q_index and k_index"):
        _cpu._C.attention_forward_rect(*args, ptrs, *tail, 8, iq.data_ptr(), 0, True)

"""rope_and_cache(..., codebook=, codes=): each key's code (of the key as given, before RoPE) is
written at its slot, -1 slots skipped, the rest of the op unchanged; bad input before any write."""
import pytest
import torch

import posattn
from posattn import vq
from tests.conftest import DEVICE

BACKENDS = ["cpu", "triton", "reference"]


def _dev(be):
    return "cpu" if be == "cpu" else DEVICE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_codes_written_at_the_keys_slots(backend, kv_layout):
    dev = _dev(backend)
    T, HQ, HK, D, NB, PS = 7, 6, 3, 80, 4, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dev) for h in (HQ, HK, HK))
    spec = posattn.RopeSpec(head_dim=D)
    cb = vq.fit(torch.randn(200, HK, D, generator=g), torch.randn(50, HQ, D, generator=g), 9, iters=2).to(dev)
    shape = (NB, PS, HK, D) if kv_layout == "NHD" else (NB, HK, PS, D)
    kc, vc = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    kc2, vc2 = kc.clone(), vc.clone()
    codes = torch.full((NB, PS, HK), 77, dtype=torch.int16, device=dev)
    slots = torch.tensor([5, -1, 0, 9, 15, -1, 2], dtype=torch.int64, device=dev)
    pos = torch.arange(10, 10 + T, device=dev)
    qo = posattn.rope_and_cache(q, k, v, pos, spec, kc, vc, slots, kv_layout=kv_layout, backend=backend,
                                codebook=cb, codes=codes)
    qo2 = posattn.rope_and_cache(q, k, v, pos, spec, kc2, vc2, slots, kv_layout=kv_layout, backend=backend)
    assert torch.equal(qo, qo2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    want = vq.assign(k.cpu(), cb.to("cpu"))
    flat = codes.cpu().view(-1, HK)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], want[t]), (t, s)
    untouched = [s for s in range(NB * PS) if s not in slots.tolist()]
    assert (flat[untouched] == 77).all()


def test_bad_input():
    T, H, D = 3, 2, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D)
    spec = posattn.RopeSpec(head_dim=D)
    kc, vc = torch.zeros(2, 4, H, D), torch.zeros(2, 4, H, D)
    slots = torch.arange(T)
    cb = vq.fit(torch.randn(20, H, D), None, 4, iters=1)
    codes = torch.zeros(2, 4, H, dtype=torch.int16)
    args = (q, k, v, torch.arange(T), spec, kc, vc, slots)
    with pytest.raises(ValueError, match="codebook and codes go together"):
        posattn.rope_and_cache(*args, codebook=cb)
    with pytest.raises(TypeError, match="codes must be torch.int16"):
        posattn.rope_and_cache(*args, codebook=cb, codes=codes.int())
    with pytest.raises(ValueError, match="codes must be \\[num_blocks=2, page_size=4, Hk=2\\]"):
        posattn.rope_and_cache(*args, codebook=cb, codes=codes[:1])
    with pytest.raises(ValueError, match="codebook has head_dim 32 but k have head_dim 16"):
        posattn.rope_and_cache(*args, codebook=vq.fit(torch.randn(20, H, 32), None, 4, iters=1), codes=codes)
    assert (kc == 0).all() and (codes == 0).all()           # nothing was written by the refused calls

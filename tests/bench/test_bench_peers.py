"""The peer adapters of the rope cases, checked on the CPU against the fp64 reference.

FlashInfer and flash-attn are not installed here (they come as wheels on a GPU
machine), so their adapters are driven through stand-in modules that follow
each library's documented contract; transformers is real. A stand-in cannot
show the library is fast or right, only that the adapter feeds it the
documented layouts and turns its outputs back into the reference's.
"""
import sys
import types

import pytest
import torch

from posattn.bench.registry import ops

ROPE = ops()["rope"]
SHAPE = "B=2,S=5,Hq=4,Hk=2,D=64"


def _run(name, dtype=torch.float32):
    inp = ROPE.make_inputs(ROPE.parse_shape(SHAPE), dtype, "cpu")
    ref = ROPE.reference(inp)
    prepared = ROPE.impls[name].factory({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                         for k, v in inp.items()}, "cpu")
    fn, canon = prepared if isinstance(prepared, tuple) else (prepared, None)
    out = fn()
    out = canon(out) if canon else out
    return max(float((o.double() - r).abs().max()) for o, r in zip(out, ref))


def _rotate_half_split(x, cos, sin):
    """x [..., D] with cos/sin broadcastable to [..., D/2] (non-interleaved pairs)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def test_transformers_adapter():
    assert _run("transformers") < 1e-4


@pytest.fixture
def fake_flash_attn(monkeypatch):
    def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False):
        # documented: x [B, S, H, D]; cos/sin [S, rotary_dim / 2]; cos/sin dtype == x dtype
        assert x.dim() == 4 and cos.shape == (x.shape[1], x.shape[3] // 2) and cos.dtype == x.dtype
        assert not interleaved
        return _rotate_half_split(x, cos.float()[None, :, None, :], sin.float()[None, :, None, :])

    mods = {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.layers": types.ModuleType("flash_attn.layers"),
            "flash_attn.layers.rotary": types.ModuleType("flash_attn.layers.rotary")}
    mods["flash_attn.layers.rotary"].apply_rotary_emb = apply_rotary_emb
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0,
                           rope_theta=1e4):
        # documented: q [nnz, Hq, D], k [nnz, Hk, D], pos_ids [nnz]; angles computed in the kernel
        assert q.dim() == 3 and k.dim() == 3 and pos_ids.shape == (q.shape[0],)
        d = q.shape[-1]
        inv = 1.0 / (rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = (pos_ids.double()[:, None] / rope_scale) * inv[None]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        return (_rotate_half_split(q.double(), cos, sin).to(q.dtype),
                _rotate_half_split(k.double(), cos, sin).to(k.dtype))

    fi = types.ModuleType("flashinfer")
    rope = types.ModuleType("flashinfer.rope")
    rope.apply_rope_pos_ids = apply_rope_pos_ids
    fi.rope = rope
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flashinfer.rope", rope)


def test_flash_attn_adapter(fake_flash_attn):
    assert _run("flash-attn", torch.float32) < 1e-5


def test_flashinfer_adapter(fake_flashinfer):
    assert _run("flashinfer", torch.float32) < 1e-5


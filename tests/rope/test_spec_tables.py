"""RopeSpec.tables(): the lowered RopeTables, their caching, and a round trip of the
documented semantics (positions axis per pair, DPE positions, attention scaling) through the
fp64 reference rotation."""
import dataclasses
import math

import pytest
import torch

import posattn
from posattn.kernels.reference import rope as ref
from posattn.rope import DPE, Custom, DynamicNTK, LongRoPE, RopeSpec, YaRN
from posattn.lowered import RopeTables
from tests._tol import assert_close


def test_plain_tables():
    spec = RopeSpec(96, rotary_dim=64, base=1e4)
    t = spec.tables()
    assert isinstance(t, RopeTables)
    assert t.inv_freq.dtype == torch.float32 and t.inv_freq.shape == (32,) and t.inv_freq.is_contiguous()
    assert torch.equal(t.inv_freq, spec.inv_freq())
    assert t.attention_scaling == 1.0 and t.pair_axis is None and t.n_axes == 1
    assert t.pair_pos_scale is None and t.pair_q_offset is None


def test_contiguous_sections():
    spec = RopeSpec(128, mrope_section=[16, 24, 24])
    assert spec.mrope_section == (16, 24, 24) and spec.n_axes == 3
    t = spec.tables()
    assert t.pair_axis.dtype == torch.int32 and t.n_axes == 3
    assert t.pair_axis.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    # 3-D video RoPE with an uneven split and partial rotary
    v = RopeSpec(80, rotary_dim=48, mrope_section=(8, 8, 8)).tables()
    assert v.pair_axis.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def _interleaved_axis_by_rule(sections, half):
    """The documented rule, written pair by pair."""
    n = len(sections)
    out = []
    for p in range(half):
        a = p % n
        out.append(a if a > 0 and p < n * sections[a] else 0)
    return out


@pytest.mark.parametrize("sections, half", [((24, 20, 20), 64), ((11, 11, 10), 32), ((4, 2, 2), 8), ((3, 2), 5)])
def test_interleaved_sections(sections, half):
    spec = RopeSpec(2 * half, mrope_section=sections, mrope_interleaved=True)
    axis = spec.tables().pair_axis.tolist()
    assert axis == _interleaved_axis_by_rule(sections, half)
    assert [axis.count(a) for a in range(len(sections))] == list(sections)


def test_dpe_tables():
    dpe = DPE((0, 8, 16, 32), (1, 4, 16))
    t = RopeSpec(64, dpe=dpe).tables()
    assert t.pair_pos_scale.dtype == torch.float32
    assert t.pair_pos_scale.tolist() == [1.0] * 8 + [4.0] * 8 + [16.0] * 16
    assert t.pair_q_offset is None
    w = DPE.for_window((0, 8, 16, 32), (1, 4, 16), window=1024)
    assert w.q_offsets == (0.0, 1024 - 256.0, 1024 - 64.0)
    t = RopeSpec(64, dpe=w).tables()
    assert t.pair_q_offset.tolist() == [0.0] * 8 + [768.0] * 8 + [960.0] * 16
    assert DPE([0, 8], [2.0]) == DPE((0, 8), (2,)) and hash(DPE([0, 8], [2.0])) == hash(DPE((0, 8), (2,)))


def test_per_head_tables():
    freqs = torch.rand(3, 16, dtype=torch.float64)
    t = RopeSpec(40, rotary_dim=32, scaling=Custom(freqs)).tables()
    assert t.inv_freq.shape == (3, 16) and t.inv_freq.dtype == torch.float32 and t.inv_freq.is_contiguous()
    assert torch.equal(t.inv_freq, freqs.float())


def test_tables_cache():
    spec = RopeSpec(64, scaling=YaRN(4.0, 4096), mrope_section=(8, 12, 12))
    t = spec.tables()
    assert spec.tables() is t and spec.tables("cpu") is t
    assert dataclasses.replace(spec).tables() is t  # equal specs share the entry
    assert spec.tables(seq_len=10 ** 6) is t  # YaRN does not read seq_len
    assert t.attention_scaling == spec.attention_scaling == YaRN(4.0, 4096).attention_scaling

    dyn = RopeSpec(64, scaling=DynamicNTK(2.0, 4096))
    assert dyn.depends_on_seq_len
    base = dyn.tables()
    assert dyn.tables(seq_len=17) is base and dyn.tables(seq_len=4096) is base
    longer = dyn.tables(seq_len=4097)
    assert longer is not base and not torch.equal(longer.inv_freq, base.inv_freq)
    assert dyn.tables(seq_len=4097) is longer

    lr = RopeSpec(8, scaling=LongRoPE((1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 4.0, 5.0), 4096))
    short, long_ = lr.tables(seq_len=4096), lr.tables(seq_len=4097)
    assert lr.tables() is short and lr.tables(seq_len=9000) is long_
    torch.testing.assert_close(long_.inv_freq.double() * torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64),
                               short.inv_freq.double(), rtol=2 ** -22, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_on_cuda():
    spec = RopeSpec(64, mrope_section=(8, 12, 12), dpe=DPE.for_window((0, 16, 32), (1, 8), 64))
    t = spec.tables("cuda")
    for x in (t.inv_freq, t.pair_axis, t.pair_pos_scale, t.pair_q_offset):
        assert x.is_cuda and x.is_contiguous()
    assert torch.equal(t.inv_freq.cpu(), spec.tables().inv_freq)


# -------------------------------------------------------------------- round trip through the reference

def angles_from_tables(t: RopeTables, positions: torch.Tensor, is_query: bool) -> torch.Tensor:
    """The lowering contract (posattn/lowered.py), fp64: positions [n_axes, B, S] ->
    angles [B, S, R/2] (shared inv_freq)."""
    half = t.inv_freq.shape[-1]
    axis = t.pair_axis.long() if t.pair_axis is not None else torch.zeros(half, dtype=torch.long)
    pos = positions.to(torch.float64)[axis].permute(1, 2, 0)  # [B, S, R/2]
    if t.pair_pos_scale is not None:
        pos = torch.floor(pos / t.pair_pos_scale.double())
        if is_query and t.pair_q_offset is not None:
            pos = pos + t.pair_q_offset.double()
    return pos * t.inv_freq.double()


def fp32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def angles_from_spec(spec: RopeSpec, positions: torch.Tensor, is_query: bool) -> torch.Tensor:
    """The same angles from the spec's documented semantics, written section by section and
    group by group with plain Python loops (independent of the table code)."""
    half = spec.rotary_dim // 2
    inv = spec.inv_freq().double().tolist()
    n_axes, B, S = positions.shape
    out = torch.empty(B, S, half, dtype=torch.float64)
    if spec.mrope_section is None:
        axis_of = [0] * half
    elif spec.mrope_interleaved:
        axis_of = _interleaved_axis_by_rule(spec.mrope_section, half)
    else:
        axis_of = [a for a, n in enumerate(spec.mrope_section) for _ in range(n)]
    for p in range(half):
        pos = positions[axis_of[p]].to(torch.float64)
        if spec.dpe is not None:
            g = max(i for i, b in enumerate(spec.dpe.boundaries[:-1]) if b <= p)
            pos = torch.floor(pos / fp32(spec.dpe.scales[g]))  # the tables hold them in fp32
            if is_query and spec.dpe.q_offsets is not None:
                pos = pos + fp32(spec.dpe.q_offsets[g])
        out[:, :, p] = pos * inv[p]
    return out


SPECS = [
    RopeSpec(80, scaling=YaRN(4.0, 64, mscale=1.0, mscale_all_dim=0.5)),
    RopeSpec(96, rotary_dim=48, mrope_section=(8, 8, 8)),
    RopeSpec(64, mrope_section=(12, 10, 10), mrope_interleaved=True, interleaved=True),
    RopeSpec(64, dpe=DPE.for_window((0, 4, 16, 32), (1, 3, 8), window=16)),
    RopeSpec(96, mrope_section=(16, 16, 16), dpe=DPE((0, 24, 48), (2.0, 5.0), (1.0, 2.5)),
             scaling=YaRN(8.0, 128)),
]


def _ids(s):
    return (f"D{s.head_dim}-R{s.rotary_dim}-ax{s.n_axes}-{'dpe' if s.dpe else 'nodpe'}-"
            f"{type(s.scaling).__name__}{'-perhead' if s.inv_freq_heads else ''}")


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("is_query", [True, False], ids=["q", "k"])
def test_tables_follow_the_contract(spec, is_query):
    """Angles from the tables, read as posattn/lowered.py says, equal the angles the
    spec's documentation defines (both fp64, exactly)."""
    g = torch.Generator().manual_seed(11)
    positions = torch.randint(0, 5000, (spec.n_axes, 2, 7), generator=g)
    ang = angles_from_tables(spec.tables(), positions, is_query)
    torch.testing.assert_close(ang, angles_from_spec(spec, positions, is_query), rtol=0, atol=0)


PER_HEAD = RopeSpec(48, rotary_dim=32, scaling=Custom(torch.rand(3, 16, generator=torch.Generator().manual_seed(5)),
                                                        attention_factor=0.75), mrope_section=(4, 6, 6))


@pytest.mark.parametrize("spec", SPECS + [PER_HEAD], ids=_ids)
@pytest.mark.parametrize("is_query", [True, False], ids=["q", "k"])
def test_round_trip_through_reference(spec, is_query):
    """spec -> tables -> the fp64 reference (its angles and rotation) equals the rotation
    written directly from the spec's documented semantics, attention_scaling included."""
    B, S, H = 2, 7, 3
    g = torch.Generator().manual_seed(11)
    positions = torch.randint(0, 5000, (spec.n_axes, B, S), generator=g)
    t = spec.tables()
    x = torch.randn(B, S, H, spec.head_dim, dtype=torch.float64, generator=g)
    out = ref.rotate(x, ref.rope_angles(positions, t, is_query), spec.rotary_dim, spec.interleaved,
                     float(t.attention_scaling))
    # direct: pair (i, j) of head h -> a * (x_i c - x_j s, x_j c + x_i s)
    if spec.inv_freq_heads:
        want = torch.stack([angles_from_spec(dataclasses.replace(spec, scaling=Custom(row)), positions, is_query)
                            for row in spec.scaling.inv_freq], dim=2)           # [B, S, H, R/2]
    else:
        want = angles_from_spec(spec, positions, is_query)[:, :, None, :]      # [B, S, 1, R/2]
    a = spec.attention_scaling
    c, s = a * torch.cos(want), a * torch.sin(want)
    half = spec.rotary_dim // 2
    if spec.interleaved:
        i, j = torch.arange(0, spec.rotary_dim, 2), torch.arange(1, spec.rotary_dim, 2)
    else:
        i, j = torch.arange(half), torch.arange(half, spec.rotary_dim)
    direct = x.clone()
    direct[..., i] = x[..., i] * c - x[..., j] * s
    direct[..., j] = x[..., j] * c + x[..., i] * s
    assert_close(out, direct, torch.float64)
    if isinstance(spec.scaling, YaRN) and spec.scaling.mscale:
        assert t.attention_scaling == pytest.approx((0.1 * math.log(4.0) + 1) / (0.05 * math.log(4.0) + 1))


# ---------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("build, exc, match", [
    (lambda: RopeSpec(128, mrope_section=(16, 24, 20)), ValueError,
     r"mrope_section \(16, 24, 20\) must sum to rotary_dim/2 = 64"),
    (lambda: RopeSpec(128, rotary_dim=64, mrope_section=(16, 24, 24)), ValueError, "must sum to rotary_dim/2 = 32"),
    (lambda: RopeSpec(128, mrope_section=(16, 24.0, 24)), TypeError, r"mrope_section\[1\] must be an int"),
    (lambda: RopeSpec(128, mrope_section=(80, -8, -8)), ValueError, r"mrope_section\[1\] must be >= 0"),
    (lambda: RopeSpec(128, mrope_section=()), ValueError, "at least one axis"),
    (lambda: RopeSpec(128, mrope_section=16), TypeError, "mrope_section must be a sequence of ints"),
    (lambda: RopeSpec(128, mrope_section=(16, 24, 24), mrope_interleaved=True), ValueError,
     "interleaved axis 1 needs pairs up to 70, but there are only 64"),
    (lambda: RopeSpec(128, mrope_interleaved=True), ValueError, "mrope_interleaved=True needs mrope_section"),
    (lambda: RopeSpec(128, mrope_section=(64,), mrope_interleaved=1), TypeError, "mrope_interleaved must be a bool"),
    (lambda: DPE((0, 8, 8), (1, 2)), ValueError, "strictly increasing"),
    (lambda: DPE((1, 8), (1,)), ValueError, "must start at 0"),
    (lambda: DPE((0, 8, 16), (1,)), ValueError, r"scales must have one entry per group \(2\), got 1"),
    (lambda: DPE((0, 8), (0.0,)), ValueError, "scales must all be > 0"),
    (lambda: DPE((0, 8), (2.0,), (1.0, 2.0)), ValueError, "q_offsets must have one entry per group"),
    (lambda: DPE((0, 8.0), (2.0,)), TypeError, r"boundaries\[1\] must be an int"),
    (lambda: DPE.for_window((0, 8), (2.0,), window=-1), ValueError, "window must be a non-negative int"),
    (lambda: RopeSpec(64, dpe=DPE((0, 16), (2,))), ValueError, "dpe.boundaries must end at rotary_dim/2 = 32"),
    (lambda: RopeSpec(64, dpe=((0, 32), (2,))), TypeError, "dpe must be None or a posattn.rope.DPE"),
])
def test_bad_specs(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_spec_is_hashable_and_frozen():
    a = RopeSpec(128, mrope_section=[16, 24, 24], dpe=DPE([0, 64], [1]), scaling=YaRN(4, 1024))
    b = RopeSpec(128, mrope_section=(16, 24, 24), dpe=DPE((0, 64), (1.0,)), scaling=YaRN(4.0, 1024))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.base = 2.0
    assert posattn.DPE is DPE


def test_pickle_and_copy_rehash():
    import copy
    import os
    import pickle
    import subprocess
    import sys

    spec = RopeSpec(64, scaling=Custom([[0.5] * 32, [0.25] * 32]), mrope_section=(8, 12, 12),
                    dpe=DPE.for_window((0, 16, 32), (1, 4), 32))
    for other in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec), dataclasses.replace(spec)):
        assert other == spec and hash(other) == hash(spec)
    # hash(None) is address-based before Python 3.12: a spec pickled in another process
    # must still hash like an equal spec built here
    code = "import pickle, sys, posattn; from posattn.rope import *; sys.stdout.buffer.write(pickle.dumps(" \
           "RopeSpec(64, scaling=YaRN(4.0, 1024), mrope_section=(8, 12, 12), dpe=None)))"
    root = os.path.dirname(os.path.dirname(posattn.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    blob = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env,
                          timeout=120).stdout
    here = RopeSpec(64, scaling=YaRN(4.0, 1024), mrope_section=(8, 12, 12))
    theirs = pickle.loads(blob)
    assert theirs == here and hash(theirs) == hash(here)

"""Every scaling against transformers' own ROPE_INIT_FUNCTIONS, for real model configs.

Comparison: inv_freq bitwise (torch.equal) and attention_scaling exactly. Bitwise is
the right bar here: the spec evaluates the same fp32 torch operations in the same
order as transformers 5.23, on the same device (CPU), so any difference would be a
different formula, not rounding. (On another device transformers' own pow/div kernels
may round differently; the spec always builds its tables on the CPU.)
"""
import math

import pytest
import torch

import posattn
from posattn.rope import scaling as sc
from tests.rope.hf_cases import CASES, FORMS, hf_tables, make, rotary_class

def pow_rtol(base: float) -> float:
    """Relative error bound of transformers' fp32 ``1 / base ** (2p/R)`` against fp64: the
    exponent is rounded to fp32 (half an ulp, < 2^-24 relative to a value < 1, amplified by
    ln(base) through the power) plus the roundings of pow, the division and the input."""
    return (math.log(base) + 3) * 2 ** -24


SEQ_LENS = (None, 1, 2048, 4096, 4097, 8192, 8193, 32768, 32769, 100000, 131073, 400000)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case):
    ref = make(case, "v4-object")
    specs = {form: posattn.RopeSpec.from_hf_config(make(case, form)) for form in FORMS}
    for form, spec in specs.items():
        assert spec == specs["v4-object"] and hash(spec) == hash(specs["v4-object"]), form
    spec = specs["v4-object"]
    for seq_len in SEQ_LENS:
        inv_freq, attention_scaling = hf_tables(ref, seq_len)
        ours = spec.inv_freq(seq_len)
        assert ours.dtype == torch.float32 and ours.shape == inv_freq.shape
        assert torch.equal(ours, inv_freq), f"{case} seq_len={seq_len}: max diff {(ours - inv_freq).abs().max()}"
        assert spec.attention_scaling == attention_scaling, case
        # transformers also builds the same tables from the v5 form of the config
        inv5, scale5 = hf_tables(make(case, "v5-object"), seq_len)
        assert torch.equal(inv5, inv_freq) and scale5 == attention_scaling


def test_case_scalings_are_the_expected_classes():
    want = {"llama3.1": sc.Llama3, "qwen2-yarn": sc.YaRN, "deepseek-v2-yarn": sc.YaRN, "deepseek-yarn-mscale": sc.YaRN,
            "phi3-longrope": sc.LongRoPE, "phi4-mini-longrope": sc.LongRoPE, "llama-dynamic": sc.DynamicNTK,
            "llama-linear": sc.Linear, "qwen2-vl": type(None), "qwen3-vl": type(None),
            "qwen2.5-vl": type(None), "qwen3-vl-yarn": sc.YaRN}
    assert set(want) == set(CASES)
    for case, cls in want.items():
        assert type(posattn.RopeSpec.from_hf_config(make(case, "v4-object")).scaling) is cls, case


def test_depends_on_seq_len():
    for case in CASES:
        spec = posattn.RopeSpec.from_hf_config(make(case, "v4-object"))
        assert spec.depends_on_seq_len == (case in ("llama-dynamic", "phi3-longrope", "phi4-mini-longrope")), case


def test_yarn_attention_scaling_formulas():
    # independent of transformers: m(s, k) = 0.1 k ln s + 1
    def m(s, k=1.0):
        return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

    assert sc.YaRN(4.0, 32768).attention_scaling == pytest.approx(m(4.0), rel=1e-15)
    assert sc.YaRN(40.0, 4096, mscale=1.0, mscale_all_dim=0.707).attention_scaling == \
        pytest.approx(m(40.0, 1.0) / m(40.0, 0.707), rel=1e-15)
    assert sc.YaRN(40.0, 4096, mscale=0.707, mscale_all_dim=0.707).attention_scaling == 1.0
    # mscale without mscale_all_dim falls back to m(factor): transformers' rule
    assert sc.YaRN(40.0, 4096, mscale=0.707).attention_scaling == pytest.approx(m(40.0), rel=1e-15)
    assert sc.YaRN(40.0, 4096, attention_factor=0.5).attention_scaling == 0.5


def test_longrope_attention_scaling():
    s = sc.LongRoPE((1.0,) * 4, (2.0,) * 4, 4096, factor=32.0)
    assert s.attention_scaling == pytest.approx(math.sqrt(1 + math.log(32.0) / math.log(4096)), rel=1e-15)
    assert sc.LongRoPE((1.0,) * 4, (2.0,) * 4, 4096).attention_scaling == 1.0
    assert sc.LongRoPE((1.0,) * 4, (2.0,) * 4, 4096, attention_factor=1.25, factor=32.0).attention_scaling == 1.25


def test_fixed_ntk_is_dynamic_ntk_frozen():
    """NTK(a) has no transformers rope_type; transformers' "dynamic" type gives the same table
    at seq_len where factor * L / max_pos - (factor - 1) = a (here f=2, L=2*max_pos -> a=3)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=4096, num_hidden_layers=1,
                      vocab_size=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    inv_freq, scale = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=8192)
    spec = posattn.RopeSpec(128, scaling=sc.NTK(3.0))
    assert torch.equal(spec.inv_freq(), inv_freq) and spec.attention_scaling == scale == 1.0
    assert not spec.depends_on_seq_len
    # and the NTK-aware formula itself, in fp64: base' = base * a^(R/(R-2))
    R = 96
    ntk = posattn.RopeSpec(R, base=10000.0, scaling=sc.NTK(8.0)).inv_freq().double()
    base = 10000.0 * 8.0 ** (R / (R - 2))
    want = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    torch.testing.assert_close(ntk, want, rtol=pow_rtol(base), atol=0)


def test_linear_is_default_over_factor():
    plain = posattn.RopeSpec(80, base=10000.0).inv_freq()
    lin = posattn.RopeSpec(80, base=10000.0, scaling=sc.Linear(4.0)).inv_freq()
    torch.testing.assert_close(lin.double(), plain.double() / 4.0, rtol=2 ** -23, atol=0)


def test_llama3_bands_fp64():
    """Independent check of Llama 3.1's three bands (fp64 oracle, fp32 tolerance)."""
    f, lo, hi, L = 8.0, 1.0, 4.0, 8192
    got = posattn.RopeSpec(128, base=500000.0, scaling=sc.Llama3(f, lo, hi, L)).inv_freq().double()
    inv = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    wl = 2 * math.pi / inv
    smooth = (L / wl - lo) / (hi - lo)
    want = torch.where(wl < L / hi, inv, torch.where(wl > L / lo, inv / f, (1 - smooth) * inv / f + smooth * inv))
    torch.testing.assert_close(got, want, rtol=pow_rtol(500000.0) + 4 * 2 ** -24, atol=0)
    assert (got == (inv.float() / f).double()).any() and (got == inv.float().double()).any()  # both ends occur


def test_yarn_keeps_high_and_interpolates_low_frequencies():
    spec = posattn.RopeSpec(128, base=1e6, scaling=sc.YaRN(4.0, 32768))
    got, plain = spec.inv_freq().double(), posattn.RopeSpec(128, base=1e6).inv_freq().double()
    low, high = spec.scaling.correction_range(1e6, 128)
    assert 0 < low < high < 64
    torch.testing.assert_close(got[: int(low)], plain[: int(low)], rtol=2 ** -23, atol=0)
    torch.testing.assert_close(got[int(high):], plain[int(high):] / 4.0, rtol=2 ** -22, atol=0)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_seq_len_means_max_position_plus_one(kind):
    """What transformers' model does at run time (its rotary module's dynamic update, which
    reads max(position_ids) + 1) equals spec.inv_freq(seq_len=max(position_ids) + 1)."""
    case = {"dynamic": "llama-dynamic", "longrope": "phi3-longrope"}[kind]
    cfg = make(case, "v4-object")
    spec = posattn.RopeSpec.from_hf_config(cfg)
    original = cfg.max_position_embeddings if kind == "dynamic" else cfg.rope_parameters[
        "original_max_position_embeddings"]
    for last in (5, original - 1, original, original + 300):
        rotary = rotary_class(cfg)(cfg)
        x = torch.zeros(1, 1, dtype=torch.float32)
        rotary(x, torch.tensor([[0, last]]))
        assert torch.equal(rotary.inv_freq, spec.inv_freq(seq_len=last + 1)), (kind, last)
        assert rotary.attention_scaling == spec.attention_scaling


def test_custom_tables():
    freqs = torch.rand(3, 8, dtype=torch.float64) + 0.01
    a = sc.Custom(freqs)
    b = sc.Custom(freqs.tolist())
    assert a == b and hash(a) == hash(b) and a.heads == 3 and a.pairs == 8
    spec = posattn.RopeSpec(16, scaling=a)
    assert spec.inv_freq().shape == (3, 8) and spec.inv_freq().dtype == torch.float32
    assert torch.equal(spec.inv_freq(), freqs.float())
    assert spec.inv_freq_heads == 3
    one = posattn.RopeSpec(20, rotary_dim=16, scaling=sc.Custom([0.5] * 8, attention_factor=0.9))
    assert one.inv_freq().shape == (8,) and one.attention_scaling == 0.9 and one.inv_freq_heads is None


def test_scalings_hash_by_value():
    def build():
        return [sc.Linear(2), sc.NTK(4.0), sc.DynamicNTK(2.0, 4096), sc.YaRN(4, 32768, mscale=0.707),
                sc.Llama3(8, 1, 4, 8192), sc.LongRoPE([1.0] * 4, [2.0] * 4, 4096),
                sc.Custom([[1.0, 0.5, 0.3, 0.2], [0.2, 0.1, 0.05, 0.01]])]

    for x, y in zip(build(), build()):
        assert x == y and hash(x) == hash(y)
        assert posattn.RopeSpec(8, scaling=x) == posattn.RopeSpec(8, scaling=y)
    assert len({*build(), *build()}) == 7
    assert posattn.YaRN is sc.YaRN and posattn.rope.Llama3 is sc.Llama3


# ---------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("make_bad, exc, match", [
    (lambda: sc.Linear(0.0), ValueError, "Linear.factor must be > 0"),
    (lambda: sc.Linear("2"), TypeError, "Linear.factor must be a number"),
    (lambda: sc.NTK(float("inf")), ValueError, "NTK.factor must be finite"),
    (lambda: sc.DynamicNTK(2.0, 0), ValueError, "DynamicNTK.original_max_position must be positive"),
    (lambda: sc.DynamicNTK(2.0, 4096.0), TypeError, "DynamicNTK.original_max_position must be an int"),
    (lambda: sc.YaRN(-1.0, 4096), ValueError, "YaRN.factor must be > 0"),
    (lambda: sc.YaRN(4.0, 4096, truncate=1), TypeError, "YaRN.truncate must be a bool"),
    (lambda: sc.Llama3(8.0, 4.0, 1.0, 8192), ValueError, "high_freq_factor .* must be greater than low_freq_factor"),
    (lambda: sc.LongRoPE([1.0, -2.0], [1.0, 1.0], 4096), ValueError, "short_factor entries must be > 0"),
    (lambda: sc.LongRoPE([1.0, "a"], [1.0, 1.0], 4096), TypeError, r"short_factor\[1\] must be a number"),
    (lambda: sc.Custom([[1.0, 2.0], [1.0]]), ValueError, "rows must all have the same length"),
    (lambda: sc.Custom([]), ValueError, "must not be empty"),
    (lambda: sc.Custom(torch.ones(2, 2, 2)), ValueError, r"1-D \[R/2\] or 2-D \[H, R/2\]"),
    (lambda: sc.Custom([1.0, float("nan")]), ValueError, "must be finite"),
    (lambda: posattn.RopeSpec(64, scaling=sc.LongRoPE([1.0] * 31, [1.0] * 32, 4096)), ValueError,
     "short_factor must have rotary_dim/2 = 32 entries, got 31"),
    (lambda: posattn.RopeSpec(64, scaling=sc.Custom([1.0] * 16)), ValueError, "rotary_dim/2 = 32 entries per row"),
    (lambda: posattn.RopeSpec(2, scaling=sc.NTK(2.0)), ValueError, "needs rotary_dim > 2"),
    (lambda: posattn.RopeSpec(64, scaling={"rope_type": "linear"}), TypeError,
     "RopeSpec.scaling must be None or one of"),
    (lambda: posattn.RopeSpec(64).inv_freq(seq_len=0), ValueError, "seq_len must be >= 1"),
    (lambda: posattn.RopeSpec(64).inv_freq(seq_len=3.0), TypeError, "seq_len must be an int or None"),
])
def test_bad_inputs(make_bad, exc, match):
    with pytest.raises(exc, match=match):
        make_bad()

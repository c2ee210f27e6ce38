"""posattn.select.topk on every backend against an independent oracle (tests/select/_oracle.py)."""
import random

import pytest
import torch

import posattn
from tests.conftest import DEVICE, usable_backends
from tests.select._oracle import topk_rows

BACKENDS = usable_backends("topk")


def _check(scores, k, lengths=None, sinks=0, window=0, ordered=False, backend=None):
    out = posattn.select.topk(scores, k, lengths=lengths, sinks=sinks, window=window, sorted=ordered,
                              backend=backend)
    assert out.dtype == torch.int32 and tuple(out.shape) == tuple(scores.shape[:-1]) + (k,)
    N = scores.shape[-1]
    rows = scores.reshape(-1, N).double().cpu().tolist()
    R = len(rows)
    if lengths is None:
        lens = [N] * R
    else:
        ln = lengths
        if ln.dim() == 1 and scores.dim() > 2:
            ln = ln.reshape(-1, *([1] * (scores.dim() - 2))).expand(scores.shape[:-1])
        lens = ln.reshape(-1).cpu().tolist()
    want = topk_rows(rows, lens, k, sinks, window, ordered)
    assert out.reshape(R, k).cpu().tolist() == want, backend


CASES = {
    # name: (shape, k, lengths?, sinks, window)
    "single_row_7": ((7,), 3, False, 0, 0),
    "k_beyond_n": ((3, 5), 8, False, 0, 0),
    "heads3_ragged": ((2, 3, 40), 6, True, 0, 0),
    "sinks_window": ((4, 97), 11, True, 2, 4),
    "k_is_n": ((2, 33), 33, False, 1, 1),
    "k1": ((5, 64), 1, True, 0, 0),
    "k1_window": ((5, 64), 1, True, 0, 1),
    "long_row": ((2, 3000), 300, True, 4, 16),
    "wide_k": ((1, 9000), 8192, False, 0, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle(name, ordered, backend):
    shape, k, ragged, sinks, window = CASES[name]
    if backend == "triton" and name == "wide_k" and ordered:
        pytest.skip("one interpreter run of the 8192 case is enough")
    g = torch.Generator().manual_seed(len(name))
    scores = torch.randn(shape, generator=g).to(DEVICE)
    lengths = None
    if ragged:
        lengths = torch.randint(0, shape[-1] + 2, shape[:1], generator=g, dtype=torch.int32).to(DEVICE)
    _check(scores, k, lengths, sinks, window, ordered, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_specials(backend):
    """Ties go to the lower index (a radix select's threshold digit shared by many entries), -0.0
    ties with +0.0, NaN ranks below -inf, +/-inf order, and a row of one repeated value."""
    rows = [
        [1.0] * 20,
        [0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0],
        [float("nan"), -float("inf"), 2.0, float("inf"), float("nan"), -float("inf"), 0.5, 3.0],
        [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0] * 3,
        [1.0 + i * 2 ** -23 for i in range(8)][::-1] * 2,   # keys differing in the last digit only
    ]
    N = max(len(r) for r in rows)
    scores = torch.full((len(rows), N), -float("inf"))
    lens = []
    for i, r in enumerate(rows):
        scores[i, :len(r)] = torch.tensor(r)
        lens.append(len(r))
    lengths = torch.tensor(lens, dtype=torch.int32)
    for k in (1, 3, 5, 7, 12):
        for ordered in (False, True):
            _check(scores.to(DEVICE), k, lengths.to(DEVICE), ordered=ordered, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_random(seed, backend):
    """Random shapes, few distinct values (many ties), lengths per row or per leading index."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, H, N = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 700)
    scores = torch.randint(-4, 5, (B, H, N), generator=g).float() * rng.choice([1.0, 0.25, 1e-30])
    k = rng.randint(1, N + 5)
    sinks = rng.randint(0, min(3, k))
    window = rng.randint(0, min(3, k - sinks))
    per_row = rng.random() < 0.5
    shape = (B, H) if per_row else (B,)
    lengths = torch.randint(0, N + 3, shape, generator=g, dtype=torch.int64)
    _check(scores.to(DEVICE), k, lengths.to(DEVICE), sinks, window, rng.random() < 0.5, backend)


def test_half_and_double_scores():
    """fp16/bf16 scores are widened exactly (same choice as their fp32 values); fp64 runs on the reference."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 50, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        h = s.to(dt)
        assert torch.equal(posattn.select.topk(h, 9), posattn.select.topk(h.float(), 9))
    _check(s.double(), 9)


def test_noncontiguous_scores():
    s = torch.randn(60, 4).t()      # [4, 60], stride 1 along dim 0
    _check(s.to(DEVICE), 7)


BAD = [
    (dict(k=0), ValueError, "k must be from 1 to 8192"),
    (dict(k=8193), ValueError, "k must be from 1 to 8192"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=4, sinks=3, window=2), ValueError, r"sinks \+ window \(3 \+ 2\) must be at most k \(4\)"),
    (dict(k=4, sinks=-1), ValueError, "sinks must be >= 0"),
    (dict(k=4, lengths=torch.ones(2, dtype=torch.float32)), TypeError, "lengths must be an integer tensor"),
    (dict(k=4, lengths=torch.ones(3, dtype=torch.int32)), ValueError, r"lengths must be \[2, 5\] or \[2\]"),
    (dict(k=4, sorted=1), TypeError, "sorted must be a bool"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD)
def test_bad_input(kw, exc, msg):
    scores = torch.randn(2, 5, 9)
    k = kw.pop("k")
    with pytest.raises(exc, match=msg):
        posattn.select.topk(scores, k, **kw)


def test_bad_scores():
    with pytest.raises(TypeError, match="scores must be float32"):
        posattn.select.topk(torch.ones(3, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="scores must have at least one dimension"):
        posattn.select.topk(torch.tensor(1.0), 1)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        posattn.select.topk([1.0, 2.0], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_lengths_on_another_device():
    with pytest.raises(ValueError, match="lengths is on cpu but scores is on cuda"):
        posattn.select.topk(torch.randn(2, 9, device="cuda"), 3, lengths=torch.ones(2, dtype=torch.int32))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ kernel is not built")
def test_cpu_long_rows_ties_and_specials():
    """The CPU kernel's row loops at a serving size (32k entries: the vectorised key pass, the
    four-table digit histograms, the branch-free compaction and write-out): values on a 1/64 grid
    (thousands tie at the threshold), NaN and -0.0 sprinkled in, sinks and window, ragged lengths."""
    g = torch.Generator().manual_seed(13)
    s = (torch.randn(3, 32769, generator=g) * 64).round() / 64
    s[:, ::97] = float("nan")
    s[:, 5::101] = -0.0
    lengths = torch.tensor([32769, 20000, 5], dtype=torch.int32)
    _check(s, 2048, lengths, 3, 5, False, "cpu")
    _check(s[:, :4000], 1, None, 0, 0, False, "cpu")

"""benchmarks/bench_distributed.py's pair counts (the paper model of docs/distributed.md) against the dense mask."""
import random

import torch

from benchmarks.bench_distributed import _pairs, anchor_pairs
from posattn import distributed as D
from posattn.kernels.reference.attention import build_mask
from tests.attention.layouts import random_layout


def test_pair_counts_equal_the_dense_mask():
    rng = random.Random(0)
    for _ in range(60):
        T, na = rng.randint(4, 40), rng.choice([0, 1, 2])
        cu, rows = random_layout(rng, T, rng.randint(1, 2), na)
        m = build_mask(T, cu, rows, na, True, None)
        rs = torch.tensor(rows.tolist())[torch.searchsorted(rows.long(), torch.arange(T), right=True) - 1]
        anchor = torch.arange(T) < rs + na
        W, sh = rng.choice([2, 3]), rng.choice(["zigzag", "contiguous"])
        for r in range(W):
            qi = D.shard_indices(T, W, r, sh)
            for s in range(W):
                ki = D.shard_indices(T, W, s, sh)
                want = int(m[qi][:, ki][:, ~anchor[ki]].sum())
                assert _pairs(D.shard_ranges(T, W, r, sh), D.shard_ranges(T, W, s, sh), cu.tolist(), rows.tolist(),
                              na) == want
            want_a = int(m[qi][:, anchor].sum())
            assert anchor_pairs(D.shard_ranges(T, W, r, sh), cu.tolist(), rows.tolist(), na) == want_a


def test_overlap_measurement_runs():
    """The CPU overlap measurement (2 gloo ranks) runs end to end and reports every rank (its
    ratio is a timing on a shared machine, recorded in docs/distributed.md, not asserted here)."""
    from benchmarks.bench_distributed import overlap

    res = overlap(tokens=256, reps=1)
    assert [r["rank"] for r in res["ranks"]] == [0, 1]
    assert all(r["step_ms"] > 0 and r["compute_ms"] > 0 and r["blocks"] == 2 for r in res["ranks"])

"""Context-parallel anchor attention on 2 and 4 gloo ranks spawned here equals the single-process
op (out, lse, dq, dk, dv within fp32 rounding): random packings, anchors, windows, GQA, RoPE with
global positions, both shard schemes, documents crossing shard boundaries, ranks with no remote
block (nothing sent) and ranks with no token."""
import pytest
import torch

from posattn import distributed as D
from tests.distributed import _ring_cases as C
from tests.distributed._spawn import spawn


@pytest.mark.parametrize("world,n", [(2, 15), (4, 9)])
def test_equals_single_process(world, n):
    """One spawn per world size (a spawn costs seconds): the random cases, then a step whose
    documents never cross a shard (no rank sees a remote block: nothing may be sent), then at
    4 ranks a step of 5 tokens (ranks without any token)."""
    spawn(C.ring_cases, world, 100 + world, n)


def test_crossing_documents_are_covered():
    """The random cases include documents that cross shard boundaries (else the ring is idle)."""
    crossing = 0
    for W, n in ((2, 15), (4, 9)):
        short = 0
        for c in C.random_cases(100 + W, n):
            plan = D.plan_ring(c["cu"], c["rows"], c["na"], c["causal"], c["window"], W, c["shard"])
            crossing += sum(plan.visible[r][s] for r in range(W) for s in range(W) if r != s)
            cs = c["cu"].tolist()
            short += c["shard"] == "zigzag_doc" and min(b - a for a, b in zip(cs, cs[1:])) < 2 * W
        assert short >= 2, f"zigzag_doc cases with a document shorter than 2W = {2 * W}: {short}"
    assert crossing >= 10


def test_bad_input_names_the_argument():
    q = torch.zeros(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="shard must be one of"):
        D.anchor_attention(q, q, q, cu, shard="ring")
    with pytest.raises(ValueError, match="q must be 3-D"):
        D.anchor_attention(q[0], q, q, cu)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        D.anchor_attention(q, q, q, cu)

"""The CUDA C++ cache kernels (backend="cuda", used only by name: not verified on a GPU when
written) against the fp64 oracles, on a GPU; skipped elsewhere. Kept out of tests/decode so
that a failure here never stops the decode engine's GPU tests."""
from __future__ import annotations

import pytest
import torch

from posattn import dispatch

pytestmark = pytest.mark.skipif(not dispatch.backend_status("cuda")[0], reason="needs posattn._cuda and a GPU")


@pytest.mark.parametrize("case", __import__("tests.decode.test_cache_ops", fromlist=["CASES"]).CASES,
                         ids=lambda c: f"{c[0]}-d{c[1]}-{c[8]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_and_cache_cuda(case, dtype):
    from tests.decode import test_cache_ops as t

    if dtype == torch.float64 and case[0] == "yarn":
        pytest.xfail("fp32 attention_scaling in rope_math.h (as the CPU kernel)")
    t.test_rope_and_cache_matches_oracle("cuda", case, dtype)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_compact_cuda(paged, layout):
    from tests.decode import test_cache_ops_compact as t

    t.test_kv_compact_matches_oracle("cuda", paged, layout)
    t.test_kv_compact_strided_index_tensors("cuda")


def test_kv_compact_cuda_overlap():
    import posattn
    from tests.conftest import DEVICE

    kc = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1).expand(1, 12, 1, 16).contiguous().to(DEVICE)
    lens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    src = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11]], device=DEVICE)
    posattn.kv_compact(kc, kc.clone(), lens, src, torch.tensor([9], device=DEVICE), backend="cuda")
    assert kc[0, :, 0, 0].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11]

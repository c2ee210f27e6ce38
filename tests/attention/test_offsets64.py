"""64-bit pointer offsets in the Triton attention kernels.

Head offsets ``h * stride`` overflow int32 once (H - 1) * stride >= 2^31 (head-major storage of
1M tokens x 32 heads x 128). A small case reproduces it: q and k whose head stride is 2^30 + 16
elements, so head 2 starts past 2^31, over a 4 GiB fp16 storage of which only the few pages the
view covers are ever touched (Linux commits memory on first write), and v with a zero-stride
head dimension. It runs in a child process: with 32-bit offsets the kernel reads 4 GiB before
the storage and the process dies of a segmentation fault, which must fail the test, not the run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEVICE, usable_backends

SCRIPT = r"""
import json, sys, torch, posattn
from tests.attention import oracle
from tests._tol import assert_within
dev = sys.argv[1]
T, H, D = 8, 3, 16
SH = 2 ** 30 + 16
def huge_head_stride():
    st = torch.empty(2 * SH + T * D, dtype=torch.float16, device=dev)
    x = st.as_strided((T, H, D), (D, SH, 1))
    x.copy_(torch.randn(T, H, D, device=dev))
    return x
torch.manual_seed(0)
q, k = huge_head_stride(), huge_head_stride()
v = torch.randn(T, 1, D, dtype=torch.float16, device=dev).expand(T, H, D)    # head stride 0
assert q.stride(1) * (H - 1) >= 2 ** 31
cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=dev)
for x in (q, k, v):
    x.requires_grad_(True)
out, lse = posattn.anchor_attention(q, k, v, cu, return_lse=True, backend="triton")
dout = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), dout)
r_out, r_lse, r_grads, b = oracle.run(q, k, v, cu, None, 1, True, None, dout=dout, with_bounds=True)
ratios = [assert_within(out, r_out, b[0], "out"), assert_within(lse, r_lse, b[1], "lse")]
ratios += [assert_within(g, r, bb, "d" + n) for n, g, r, bb in zip("qkv", grads, r_grads, b[2:])]
print(json.dumps(ratios))
"""


@pytest.mark.skipif("triton" not in usable_backends("anchor_attention"), reason="Triton cannot run here")
def test_head_offsets_past_2_31_elements():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    res = subprocess.run([sys.executable, "-c", SCRIPT, DEVICE], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    assert res.returncode == 0, f"child exited with {res.returncode} (-11: segmentation fault)\n{res.stderr[-3000:]}"
    ratios = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(ratios) == 5 and max(ratios) <= 1.0

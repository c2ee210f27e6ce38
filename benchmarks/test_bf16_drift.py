"""benchmarks/bf16_drift.py runs and prints its table; the fused "bf16x3" score stays put while
the bf16 pipelines move (a short sweep: 12 positions up to 2^20)."""
import re

import pytest

pytest.importorskip("transformers")


def test_drift_table(capsys):
    import torch

    from benchmarks import bf16_drift
    from posattn.kernels import triton as tk

    # the Triton kernel (under the interpreter on a CPU when TRITON_INTERPRET=1), else the C++ one
    backend = "triton" if tk.device_ok("cuda" if torch.cuda.is_available() else "cpu") else "cpu"
    assert bf16_drift.main(["--points", "12", "--backend", backend]) == 0
    text = capsys.readouterr().out
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| (.+?) \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$", text, re.M)}
    assert len(rows) >= 5, text
    x3 = rows['fused `"bf16x3"`']
    f32 = rows['fused `"fp32"`']
    for name in ("transformers bf16 (bf16 cos/sin)", "`apply_rope` + bf16 attention"):
        assert rows[name][0] > 100 * x3[0], text          # spread: bf16 rounding moves the score
    assert x3[0] < 1e-4 and x3[1] < 1e-4 and f32[1] < 1e-5, text

"""Bad input to decode_attention's key_positions, qk_precision and position_map: a named
ValueError/TypeError before any kernel runs (the kernels are patched to fail if launched)."""
import pytest
import torch

import posattn
from posattn.decode import attention as A
from tests.conftest import DEVICE
from tests.decode._oracle import Case

ROPE = posattn.RopeSpec(16, rotary_dim=12)


@pytest.fixture
def no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(A._Plan, "run", lambda *a, **k: boom())
    A.clear_plans()
    yield
    A.clear_plans()


def _args():
    case = Case(q_lens=[1, 1], cached=[3, 5], page_size=4, device=DEVICE)
    args, kw = case.args()
    return case, args, kw


BAD = [
    (dict(qk_precision="bf16x3"), ValueError, "needs rope="),
    (dict(rope=ROPE, qk_precision="tf32"), ValueError, "qk_precision must be one of"),
    (dict(key_positions="slots"), ValueError, "key_positions is read only with rope="),
    (dict(rope=ROPE, key_positions="pages"), ValueError, 'key_positions must be "slots" or a tensor'),
    (dict(rope=ROPE, key_positions=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "key_positions must be"),
    (dict(rope=ROPE, key_positions=torch.zeros(8, dtype=torch.bool)), TypeError, "key_positions must be int32"),
    (dict(position_map=posattn.ReRoPE(4), key_positions="slots"), ValueError, "position_map needs rope="),
    (dict(rope=ROPE, position_map=posattn.ReRoPE(4)), ValueError, "position_map needs key_positions"),
    (dict(rope=ROPE, position_map="rerope", key_positions="slots"), TypeError, "position_map must be one of"),
    (dict(rope=ROPE, key_positions="slots", position_map=posattn.VistaRoPE(torch.zeros(2, 5, dtype=torch.bool))),
     ValueError, "visual must have shape"),
    (dict(rope=posattn.RopeSpec(16, mrope_section=(2, 3, 3)), key_positions="slots"), ValueError, "one inv_freq row"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_rotary_input(i, no_launch):
    extra, exc, words = BAD[i]
    case, args, kw = _args()
    kw = dict(kw, **extra)
    if isinstance(kw.get("key_positions"), torch.Tensor):
        kw["key_positions"] = kw["key_positions"].to(DEVICE)
    with pytest.raises(exc, match=words):
        posattn.decode_attention(*args, **kw, backend="reference")


def test_bad_range_of_map_arguments():
    with pytest.raises(ValueError, match="window must be >= 1"):
        posattn.ReRoPE(0)
    with pytest.raises(ValueError, match="group must be >= 1"):
        posattn.SelfExtend(0, 4)

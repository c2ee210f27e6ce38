"""DTensor sharding rules of posattn's ops on 2 gloo ranks spawned here (see _dtensor_cases.py)."""
from tests.distributed import _dtensor_cases as C
from tests.distributed._spawn import spawn


def test_sharded_ops_equal_local_ops():
    spawn(C.all_cases, 2)


def test_two_dimensional_mesh():
    spawn(C.mesh_2d_cases, 4)


def test_decode_ops_sharded_on_heads_or_batch():
    from tests.distributed import _decode_cases as DC

    spawn(DC.all_decode_cases, 2)

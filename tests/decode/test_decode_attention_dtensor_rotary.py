"""decode_attention on DTensors (2 gloo ranks) with the in-kernel rotation: head- and batch-sharded
calls with key_positions="slots", a position map and qk_precision equal the local op; a
key_positions tensor with DTensor inputs is a named error (it is not sharded with the cache)."""
import torch

from tests.distributed._spawn import spawn


def _cases(rank, world):
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    import posattn
    from tests.distributed._decode_cases import _decode

    mesh = DeviceMesh("cpu", list(range(world)))
    g = torch.Generator().manual_seed(5)
    B, Tq, HQ, HK, Dh, S = 4, 3, 4, 2, 80, 24
    q = torch.randn(B, Tq, HQ, Dh, generator=g)
    k, v = torch.randn(B, Tq, HK, Dh, generator=g), torch.randn(B, Tq, HK, Dh, generator=g)
    kc, vc = torch.randn(B, S, HK, Dh, generator=g), torch.randn(B, S, HK, Dh, generator=g)
    lens = torch.tensor([5, 0, 19, 12], dtype=torch.int32)
    spec = posattn.RopeSpec(Dh)
    full = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, k=k, v=v)
    heads = dict(q=Shard(2), k_cache=Shard(2), v_cache=Shard(2), k=Shard(2), v=Shard(2))
    batch = dict(q=Shard(0), k_cache=Shard(0), v_cache=Shard(0), cache_seqlens=Shard(0), k=Shard(0), v=Shard(0))
    rot = dict(rope=spec, key_positions="slots", position_map=posattn.SelfExtend(2, 4), qk_precision="bf16x3")
    _decode(mesh, full, heads, "decode heads, pre-RoPE cache, SelfExtend", **rot)
    _decode(mesh, full, batch, "decode batch, pre-RoPE cache, SelfExtend", **rot)
    dq = distribute_tensor(q.clone(), mesh, [Shard(2)])
    try:
        posattn.decode_attention(dq, distribute_tensor(kc.clone(), mesh, [Shard(2)]),
                                 distribute_tensor(vc.clone(), mesh, [Shard(2)]), lens, rope=spec,
                                 key_positions=torch.arange(S), backend="cpu")
    except ValueError as e:
        assert "key_positions='slots' only" in str(e), e
    else:
        raise AssertionError("a key_positions tensor with DTensor inputs must raise")


def test_rotary_decode_on_dtensors():
    spawn(_cases, 2)

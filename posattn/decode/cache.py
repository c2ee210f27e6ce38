"""Cache writes of the decode engine: rope_and_cache (fused RoPE + paged append); the
layouts and checks kv_compact (posattn/decode/compact.py) shares.

Cache layouts: paged ``[num_blocks, page_size, Hk, D]`` ("NHD", vLLM / FlashInfer) or
``[num_blocks, Hk, page_size, D]`` ("HND"); a contiguous cache ``[B, S_cap, Hk, D]`` is
NHD with one block per request and page_size = S_cap. Kernels see NHD-ordered views
(any strides, last dimension contiguous). Both ops are torch.library custom ops with
fake implementations (torch.compile traces them) that mutate the caches in place; the
eager path keeps a per-signature plan (checks, tables, kernel choice) as apply_rope does.

Value checks (slot range, kv_compact's sources and counts, block table entries) read
the index tensors' values: ``check=None`` runs them only for CPU tensors (no device sync
there) outside torch.compile; ``check=True`` runs them on any device (one device-to-host
copy), ``False`` never.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posattn import _plans, dispatch
from posattn import _supports as S
from posattn import _validate as V
from posattn.kernels import cpu_cache
from posattn.kernels.reference import cache as ref_cache
from posattn.lowered import RopeTables, token_bucket
from posattn.rope.layout import check_rows, pos_tensor, positions_3d, tables_for
from posattn.rope.spec import RopeSpec

KV_LAYOUTS = ("NHD", "HND")
_ALL = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class CacheKey:
    """rope_and_cache's kernel key."""

    device_type: str
    dtype: str
    head_dim: int
    rotary_dim: int
    heads_q: int
    heads_k: int
    rows: int
    n_axes: int
    dpe: bool
    rotate_k: bool
    tokens_bucket: int


def _dname(dt) -> str:
    return str(dt).removeprefix("torch.")


def _nhd(cache: torch.Tensor, kv_layout: str) -> torch.Tensor:
    return cache if kv_layout == "NHD" else cache.transpose(1, 2)


def _want_values(check, device) -> bool:
    if check is None:   # CPU tensors: reading values costs no device sync (nor a graph break when not compiling)
        return device.type == "cpu" and not torch.compiler.is_compiling()
    V.boolean(check, "check")
    return check


def _check_cache_pair(k_cache, v_cache, kv_layout, Hk, D, Dv, dtype, device):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        V.float_tensor(c, name)
        if c.dim() != 4:
            raise ValueError(f"{name} must be 4-D ([num_blocks, page_size, Hk, D] for kv_layout='NHD', "
                             f"[num_blocks, Hk, page_size, D] for 'HND'); got shape {tuple(c.shape)}")
        if c.dtype != dtype:
            raise TypeError(f"{name} must have the new keys' dtype {dtype}; got {c.dtype}")
        if c.device != device:
            raise ValueError(f"{name} is on {c.device} but k is on {device}; all tensors must be on one device")
        if c.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension; got strides {c.stride()}")
    kc, vc = _nhd(k_cache, kv_layout), _nhd(v_cache, kv_layout)
    if kc.shape[:2] != vc.shape[:2]:
        raise ValueError(f"k_cache and v_cache must have the same blocks and page size; got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)} (kv_layout={kv_layout!r})")
    if Hk is not None:
        for name, c, d in (("k_cache", kc, D), ("v_cache", vc, Dv)):
            if c.shape[2] != Hk or c.shape[3] != d:
                raise ValueError(f"{name} must hold Hk = {Hk} heads of size {d} (the new tokens'); got shape "
                                 f"{tuple(c.shape if kv_layout == 'NHD' else c.transpose(1, 2).shape)} "
                                 f"(kv_layout={kv_layout!r})")
    if kc.shape[2] != vc.shape[2]:
        raise ValueError(f"k_cache and v_cache must have the same number of heads; got {kc.shape[2]} and {vc.shape[2]}")
    return kc, vc


# ---------------------------------------------------------------------------
# rope_and_cache

def _run_rope_cache(q, qo, k, v, kc, vc, slots, pos3, tables, rotary_dim, interleaved, rotate_k, key, backend):
    kernel, config = dispatch.select("rope_and_cache", key, backend=backend or None, device_index=q.device.index)
    kernel.fn(q, qo, k, v, kc, vc, slots, pos3, tables, rotary_dim, interleaved, rotate_k, config)


@torch.library.custom_op("posattn::rope_and_cache", mutates_args=("k_cache", "v_cache"))
def _rope_cache_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots: torch.Tensor, pos3: torch.Tensor, inv_freq: torch.Tensor,
                   pair_axis: Optional[torch.Tensor], pair_pos_scale: Optional[torch.Tensor],
                   pair_q_offset: Optional[torch.Tensor], attention_scaling: float, rotary_dim: int,
                   interleaved: bool, rotate_k: bool, hnd: bool, backend: str) -> torch.Tensor:
    """q: [T, Hq, D], k: [T, Hk, D], v: [T, Hk, Dv], caches in their layout -> rotated q."""
    tables = RopeTables(inv_freq, attention_scaling, pair_axis, pos3.shape[0], pair_pos_scale, pair_q_offset)
    kc, vc = _nhd(k_cache, "HND" if hnd else "NHD"), _nhd(v_cache, "HND" if hnd else "NHD")
    qo = torch.empty_like(q)
    rows = 1 if inv_freq.dim() == 1 else inv_freq.shape[0]
    key = _cache_key(q, k, rotary_dim, rows, pos3.shape[0], pair_pos_scale is not None, rotate_k)
    _run_rope_cache(q[None], qo[None], k[None], v[None], kc, vc, slots, pos3, tables, rotary_dim, interleaved,
                    rotate_k, key, backend)
    return qo


@_rope_cache_op.register_fake
def _rope_cache_fake(q, k, v, k_cache, v_cache, slots, pos3, inv_freq, pair_axis, pair_pos_scale,
                     pair_q_offset, attention_scaling, rotary_dim, interleaved, rotate_k, hnd, backend):
    return torch.empty_like(q)


def _cache_key(q, k, rotary_dim, rows, n_axes, dpe, rotate_k) -> CacheKey:
    return CacheKey(k.device.type, _dname(k.dtype), k.shape[2], rotary_dim, q.shape[1], k.shape[1], rows,
                    n_axes, dpe, rotate_k, token_bucket(k.shape[0]))


_PLANS: dict = _plans.new_table()
PLAN_CACHE_SIZE = 256


_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_ctx_backend = dispatch.context_backend
_env_backend = dispatch.env_backend_raw
_Tensor = torch.Tensor


def _sig(t):
    return (t.shape, t.stride(), t.dtype, t.device)


class _CachePlan:
    """What rope_and_cache decided for one checked signature (eager, no grad): the kernel, its
    config and tables; run() reshapes (views; copies only where the signature needs them) and launches."""

    __slots__ = ("fn", "config", "tables", "n_axes", "rotary_dim", "interleaved", "rotate_k", "hnd", "values",
                 "n_slots")

    def __init__(self, kernel, config, tables, n_axes, rotary_dim, interleaved, rotate_k, hnd):
        self.fn, self.config, self.tables, self.n_axes = kernel.fn, config, tables, n_axes
        self.rotary_dim, self.interleaved, self.rotate_k, self.hnd = rotary_dim, interleaved, rotate_k, hnd
        self.values, self.n_slots = False, 0

    def run(self, q, k, v, positions, k_cache, v_cache, slot_mapping):
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        # the kernels read token t's position and slot at t (unit stride)
        pos3 = (positions if positions.is_contiguous() else positions.contiguous()).view(self.n_axes, 1, -1)
        if not slot_mapping.is_contiguous():
            slot_mapping = slot_mapping.contiguous()
        kc, vc = (k_cache.transpose(1, 2), v_cache.transpose(1, 2)) if self.hnd else (k_cache, v_cache)
        qo = torch.empty_like(q)
        self.fn(q.unsqueeze(0), qo.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), kc, vc, slot_mapping, pos3,
                self.tables, self.rotary_dim, self.interleaved, self.rotate_k, self.config)
        return qo


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, spec: RopeSpec,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   kv_layout: str = "NHD", rotate_k: bool = True, check: bool | None = None,
                   backend: str | None = None, seq_len: int | None = None, codebook=None,
                   codes: torch.Tensor | None = None, page_summary=None) -> torch.Tensor:
    """Rotate q and k by their positions, write the rotated k and v into a paged cache, return the rotated q.

    Args:
        q: [T, Hq, D] new queries; k: [T, Hk, D] new keys; v: [T, Hk, Dv] new values.
        positions: [T] (int32/int64/fp32/fp64), or [n_axes, T] for multi-axis specs.
        spec: the :class:`posattn.RopeSpec` (head_dim = D); every scaling, per-head rows and DPE work.
        k_cache, v_cache: [num_blocks, page_size, Hk, D] ("NHD") or [num_blocks, Hk, page_size, D]
            ("HND"), the new tokens' dtype, last dimension contiguous; written in place.
        slot_mapping: int64 [T]: token t goes to block slot // page_size, offset slot % page_size;
            -1 skips the token (vLLM's padding slots).
        rotate_k: False writes the keys as given (pre-RoPE caches); q is rotated either way.
        check: value checks of slot_mapping (None: only for CPU tensors, which costs no sync).
        backend: "triton", "cpu" or "reference" (default: the dispatch order).
        codebook, codes: a posattn.vq.Codebook and its codes cache [num_blocks, page_size, Hk]
            (codebook.code_dtype): each key's code (of k as given, before RoPE) is written at
            its slot too (A2ATS, docs/vq.md).
        page_summary: a posattn.select.PageSummary of this cache (Quest, page_size = the cache's):
            after the write, each page it touched is recomputed over its rows up to the last one
            written (pages fill in order); a summary of another page size or shape is refused
            before the write. It summarises the keys as stored (pre-RoPE with rotate_k=False).

    Returns:
        rotated q [T, Hq, D] in q's dtype. One kernel launch (no host sync when check is off),
        plus the summary's few torch ops when page_summary is given.
    """
    if page_summary is not None:
        from posattn.select.quest import check_summary_slots, update_page_summary_slots

        V.choice(kv_layout, "kv_layout", KV_LAYOUTS)
        if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4:
            check_summary_slots(page_summary, _nhd(k_cache, kv_layout))     # before any launch
        qo = rope_and_cache(q, k, v, positions, spec, k_cache, v_cache, slot_mapping, kv_layout=kv_layout,
                            rotate_k=rotate_k, check=check, backend=backend, seq_len=seq_len, codebook=codebook,
                            codes=codes)
        update_page_summary_slots(page_summary, _nhd(k_cache, kv_layout), slot_mapping)
        return qo
    if codebook is not None or codes is not None:    # A2ATS: the keys' codes written at the same slots
        from posattn.vq.ops import check_cache_codes, write_cache_codes

        check_cache_codes(k, k_cache, kv_layout, codebook, codes)
        qo = rope_and_cache(q, k, v, positions, spec, k_cache, v_cache, slot_mapping, kv_layout=kv_layout,
                            rotate_k=rotate_k, check=check, backend=backend, seq_len=seq_len)
        write_cache_codes(k, codebook, codes, slot_mapping, backend)
        return qo
    if q.__class__ is not _Tensor or k_cache.__class__ is not _Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(q, DTensor) or isinstance(k_cache, DTensor) or isinstance(v_cache, DTensor):
            from posattn.distributed import dtensor_decode   # head placements run on the local shards

            return dtensor_decode.rope_and_cache(rope_and_cache, q, k, v, positions, spec, k_cache, v_cache,
                                                 slot_mapping, kv_layout=kv_layout, rotate_k=rotate_k, check=check,
                                                 backend=backend, seq_len=seq_len)
    pk = None
    if not _is_compiling() and q.__class__ is _Tensor and spec.__class__ is RopeSpec:
        try:
            # everything the checks read: shapes, strides, dtypes, devices of every tensor, the
            # arguments and the backend request (so a bad call never finds a good call's plan)
            pk = (_sig(q), _sig(k), _sig(v), _sig(positions), spec, _sig(k_cache), _sig(v_cache),
                  _sig(slot_mapping), kv_layout, rotate_k, check, backend, seq_len, _ctx_backend(), _env_backend())
            plan = _PLANS.get(pk)
        except (AttributeError, TypeError):      # not tensors, or unhashable: the checks name them
            plan, pk = None, None
        if plan is not None and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            if plan.values:
                _check_slots(slot_mapping, plan.n_slots)
            return plan.run(q, k, v, positions, k_cache, v_cache, slot_mapping)
    tables, pos3, key = _check_rope_cache(q, k, v, positions, spec, k_cache, v_cache, slot_mapping, kv_layout,
                                          rotate_k, check, backend, seq_len)
    hnd = kv_layout == "HND"
    if torch.compiler.is_compiling() or _grad(q, k, v):
        return _rope_cache_op(q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache,
                              slot_mapping.contiguous(), pos3.contiguous(),
                              tables.inv_freq, tables.pair_axis,
                              tables.pair_pos_scale, tables.pair_q_offset, float(tables.attention_scaling),
                              spec.rotary_dim, spec.interleaved, rotate_k, hnd, backend or "")
    kernel, config = dispatch.select("rope_and_cache", key, backend=backend, device_index=q.device.index)
    plan = _CachePlan(kernel, config, tables, pos3.shape[0], spec.rotary_dim, spec.interleaved, rotate_k, hnd)
    plan.values = _want_values(check, q.device)     # (checked above on this call)
    plan.n_slots = _nhd(k_cache, kv_layout).shape[0] * _nhd(k_cache, kv_layout).shape[1]
    if pk is not None and not (seq_len is None and spec.depends_on_seq_len):
        _plans.store(_PLANS, pk, plan, PLAN_CACHE_SIZE)
    return plan.run(q, k, v, positions, k_cache, v_cache, slot_mapping)


def _grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _check_slots(slot_mapping, n: int):
    """Slots in [-1, n), n = num_blocks * page_size."""
    if slot_mapping.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(slot_mapping))
    if lo < -1 or hi >= n:
        bad = lo if lo < -1 else hi
        raise ValueError(f"slot_mapping values must be -1 or in [0, num_blocks * page_size) = [0, {n}); got {bad}")


def _check_rope_cache(q, k, v, positions, spec, k_cache, v_cache, slot_mapping, kv_layout, rotate_k, check,
                      backend, seq_len):
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.float_tensor(x, name)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D [T, heads, head_dim]; got shape {tuple(x.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    pos_tensor(positions)
    if not isinstance(spec, RopeSpec):
        raise TypeError(f"spec must be a posattn.RopeSpec, got {type(spec).__name__}")
    V.tensor(slot_mapping, "slot_mapping")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping must be int64 (block * page_size + offset, -1 to skip); "
                        f"got {slot_mapping.dtype}")
    V.choice(kv_layout, "kv_layout", KV_LAYOUTS)
    V.boolean(rotate_k, "rotate_k")
    V.same_device(q, "q", k=k, v=v, positions=positions, slot_mapping=slot_mapping)
    T, HQ, D = q.shape
    if k.shape[0] != T or v.shape[0] != T or slot_mapping.shape != (T,):
        raise ValueError(f"q, k, v and slot_mapping must have the same token count T = {T}; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, slot_mapping {tuple(slot_mapping.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads; got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != D:
        raise ValueError(f"k's head_dim ({k.shape[2]}) must equal q's ({D})")
    if D != spec.head_dim:
        raise ValueError(f"q's head_dim ({D}) must equal spec.head_dim ({spec.head_dim})")
    if HQ % k.shape[1]:
        raise ValueError(f"q's heads ({HQ}) must be a multiple of k's ({k.shape[1]}) (grouped-query attention)")
    kc, _ = _check_cache_pair(k_cache, v_cache, kv_layout, k.shape[1], D, v.shape[2], k.dtype, k.device)
    if _want_values(check, q.device):
        _check_slots(slot_mapping, kc.shape[0] * kc.shape[1])
    tables = tables_for(spec, q.device, positions, seq_len)
    pos3 = positions_3d(positions, 1, T, "thd", tables.n_axes)
    rows = check_rows(tables, HQ, k.shape[1])
    key = _cache_key(q, k, spec.rotary_dim, rows, tables.n_axes, tables.pair_pos_scale is not None, rotate_k)
    if not torch.compiler.is_compiling():   # (the custom op selects when compiled)
        dispatch.select("rope_and_cache", key, backend=backend, device_index=q.device.index)  # a backend that refuses raises here
    return tables, pos3, key


# ---------------------------------------------------------------------------
# kernels

_cpu_supports = S.cpu()
_triton_supports = S.triton(S.NATIVE, "float64 is not compiled for Triton")


@dispatch.explicit_aware
def _cuda_supports(key, explicit: bool = False):
    if key.device_type != "cuda":
        return False, f"needs CUDA tensors, got {key.device_type}"
    if not explicit:
        # DESIGN: a CUDA C++ kernel that never ran on a GPU is never a dispatch default
        return False, "the CUDA C++ cache kernels are not verified on a GPU yet: used only as backend='cuda'"
    from posattn.kernels import cuda as ck

    if not hasattr(ck.module(), "rope_cache_forward"):
        return False, "posattn._cuda was built without the cache kernels (rebuild with POSATTN_CUDA=1)"
    return True, ""


def _cuda_rope_cache(*args):
    from posattn.kernels import cuda_cache

    return cuda_cache.rope_cache_forward(*args)


def _triton_rope_cache(*args):
    from posattn.kernels.triton import cache as tc

    return tc.rope_cache_forward(*args)


def _triton_rope_cache_default(key):
    from posattn.kernels.triton import cache as tc

    return tc.default_config(key.head_dim, max(key.heads_q, key.heads_k))


def _triton_rope_cache_space(key):
    from posattn.kernels.triton import cache as tc

    return tc.search_space(key)


dispatch.register("rope_and_cache", "reference", dtypes=_ALL)(ref_cache.rope_cache_forward)
dispatch.register("rope_and_cache", "cpu", supports=_cpu_supports, dtypes=_ALL,
                  default_config=lambda key: {"threads": 0})(cpu_cache.rope_cache_forward)
dispatch.register("rope_and_cache", "cuda", supports=_cuda_supports, dtypes=_ALL,
                  default_config=lambda key: {"threads": 128})(_cuda_rope_cache)
dispatch.register("rope_and_cache", "triton", supports=_triton_supports, default_config=_triton_rope_cache_default,
                  search_space=_triton_rope_cache_space)(_triton_rope_cache)

"""apply_rope_cos_sin: rotary embedding from precomputed cos/sin tables.

Most code that applies RoPE holds tables, not a spec: ``cos``/``sin`` from a
model's rotary module (transformers, Liger, flash-attn) or a ``cos_sin_cache``
indexed by positions (vLLM, FlashInfer, SGLang). This op applies them with a
kernel on every backend (op "rope_cos_sin"), as a torch custom op with
autograd (differentiable in q and k) that ``torch.compile(fullgraph=True)``
traces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posattn import _validate as V
from posattn import _plans, dispatch
from posattn.kernels import rope_cos_sin_native as native_kernels
from posattn.kernels.reference import rope_cos_sin as ref_kernels
from posattn.lowered import token_bucket

LAYOUTS = ("bshd", "bhsd", "thd")
# how the two table tensors hold the [Bt, N, R/2] tables the kernels read
FORM_HALF, FORM_FULL, FORM_CACHE = 0, 1, 2


@dataclass(frozen=True)
class CosSinKey:
    """What the choice of kernel and launch config depends on."""

    device_type: str
    dtype: str
    table_dtype: str
    head_dim: int
    rotary_dim: int
    interleaved: bool
    split: bool          # distinct tables for the two elements of a pair ([.., R] form)
    pos_dtype: str       # "" for the per-token form
    heads_q: int
    heads_k: int
    tokens_bucket: int   # next power of two of B*S (autotune shape bucket)



# (batch, sequence, heads, head_dim) dims of each layout; None: the dim is absent (thd's batch is 1)
_DIMS = {"bshd": (0, 1, 2, 3), "bhsd": (0, 2, 1, 3), "thd": (None, 0, 1, 2)}


def _bshd_shape(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    b, s_, h, d = _DIMS[layout]
    shp = x.shape
    return (1 if b is None else shp[b]), shp[s_], shp[h], shp[d]


def _as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bshd":
        return x
    if layout == "bhsd":
        return x.transpose(1, 2)
    return x.unsqueeze(0)  # thd -> [1, T, H, D]


# ---------------------------------------------------------------------------
# the public op

def apply_rope_cos_sin(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None, *, cos_sin_cache: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, rotary_dim: int | None = None,
                       layout: str = "bshd", interleaved: bool = False, inplace: bool = False,
                       check_bounds: bool = True, backend: str | None = None):
    """Rotate q and k by precomputed cos/sin tables.

    Args:
        q: [B, S, Hq, D] (layout "bshd"), [B, Hq, S, D] ("bhsd") or packed [T, Hq, D] ("thd").
        k: the same layout with Hk heads, or None.
        cos, sin: the tables, same shape and dtype (any float dtype; the math is fp32, or fp64 on
            every backend when q/k are fp64):

            * per token (``positions=None``): ``[S, W]`` or ``[B or 1, S, W]`` (``[T, W]`` for "thd");
            * a cache indexed by ``positions``: ``[N, W]`` or ``[B or 1, N, W]``.

            ``W`` is ``R/2`` (one entry per rotary pair, the flash-attn / vLLM form) or ``R``
            (the duplicated-halves form transformers produces, ``cat(freqs, freqs)``, or with
            ``interleaved=True`` its ``repeat_interleave`` form). A ``[.., R]`` table is applied
            exactly as transformers' ``x * cos + rotate_half(x) * sin`` whatever its content:
            the kernels read both halves, so nothing is assumed about them.
        cos_sin_cache: instead of cos/sin, one ``[N, R]`` cache holding cos then sin (vLLM,
            FlashInfer, SGLang); needs ``positions``.
        positions: int32/int64 rows into the cache: ``[S]`` (shared by the batch), ``[B, S]``,
            or ``[T]`` for "thd". None for per-token tables.
        rotary_dim: R, the leading dims of each head that are rotated (the rest pass through).
            Default: from the table width ``W``: ``R = 2W`` when ``2W <= D``, else ``R = W``
            (so ``W == D`` is transformers' full-width form). Pass it to disambiguate a narrow
            ``[.., R]`` table (partial rotary with duplicated halves).
        layout: "bshd", "bhsd" or "thd".
        interleaved: pair (2p, 2p+1) (GPT-J) instead of (p, p + R/2) (GPT-NeoX / Llama).
        inplace: write into q and k (and return them).
        check_bounds: check on the host, before any kernel runs, that every position is a row
            of the cache (a ValueError otherwise). On a GPU this costs one device-to-host sync;
            pass False on the hot path: then nothing syncs, and the kernels still never read
            outside the table — a token whose position is out of range gets NaN in its rotated
            dims instead of a plausible-looking wrong answer.
        backend: force "cuda", "triton", "cpu" or "reference".

    Returns:
        (q_out, k_out) in the input dtype and layout; k_out is None when k is None. No
        gradient flows into the tables.
    """
    if (not _is_compiling() and q.__class__ is _Tensor and (k is None or k.__class__ is _Tensor)
            and not (_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)))
            and (cos is None or cos.__class__ is _Tensor) and (sin is None or sin.__class__ is _Tensor)
            and (cos_sin_cache is None or cos_sin_cache.__class__ is _Tensor)
            and (positions is None or positions.__class__ is _Tensor)
            and (inplace is False or inplace is True) and (interleaved is False or interleaved is True)
            and (check_bounds is False or check_bounds is True)
            and (rotary_dim is None or rotary_dim.__class__ is int) and layout.__class__ is str
            and (backend is None or backend.__class__ is str)):
        # hot path: a signature seen before (every check below passed for it) runs its plan
        # one flat tuple (nested ones cost an allocation and a hash each); the leading tag
        # says which optional tensors are present, so keys of different forms never compare equal
        if cos_sin_cache is None:
            tab_a, tab_b = cos, sin
            tag = 1
        else:  # with cos or sin too: the checked path raises
            tab_a = tab_b = None if (cos is not None or sin is not None) else cos_sin_cache
            tag = 2
        if tab_a is None or tab_b is None:
            pk = None
        else:
            if k is not None:
                tag += 2
            pk = (tag, q.shape, q.stride(), q.dtype, q.device, tab_a.shape, tab_a.dtype, tab_a.device,
                  tab_b.shape, tab_b.dtype, tab_b.device, rotary_dim, layout, interleaved, inplace, check_bounds,
                  backend, _ctx_backend(), _env_backend())
            if k is not None:
                pk += (k.shape, k.stride(), k.dtype, k.device)
            if positions is not None:
                pk += (positions.shape, positions.dtype, positions.device)
            plan = _PLANS.get(pk)
            if plan is not None:
                return plan.run(q, k, tab_a, tab_b, positions)
    else:
        pk = None
    return _apply_checked(q, k, cos, sin, cos_sin_cache, positions, rotary_dim, layout, interleaved, inplace,
                          check_bounds, backend, pk)


def _apply_checked(q, k, cos, sin, cos_sin_cache, positions, rotary_dim, layout, interleaved, inplace,
                   check_bounds, backend, pk):
    """apply_rope_cos_sin with every check; stores a plan under ``pk`` (when not None) once they pass."""
    V.float_tensor(q, "q")
    if k is not None:
        V.float_tensor(k, "k")
    V.choice(layout, "layout", LAYOUTS)
    for name, val in (("inplace", inplace), ("interleaved", interleaved), ("check_bounds", check_bounds)):
        V.boolean(val, name)
    if backend is not None:
        dispatch.requested_backend(backend)  # validates the name
    _check_qk(q, k, layout)
    B, S, _, D = _bshd_shape(q, layout)

    if cos_sin_cache is not None:
        if cos is not None or sin is not None:
            raise ValueError("pass either cos and sin, or cos_sin_cache, not both")
        V.float_tensor(cos_sin_cache, "cos_sin_cache")
        if cos_sin_cache.dim() != 2:
            raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim] (cos then sin); "
                             f"got shape {tuple(cos_sin_cache.shape)}")
        if positions is None:
            raise ValueError("cos_sin_cache needs positions (rows of the cache for each token)")
        R = cos_sin_cache.shape[-1]
        if R <= 0 or R % 2:
            raise ValueError(f"cos_sin_cache's last dim (rotary_dim) must be positive and even; got {R}")
        if rotary_dim is not None and rotary_dim != R:
            raise ValueError(f"rotary_dim ({rotary_dim}) must equal cos_sin_cache's last dim ({R})")
        form, tab_a, tab_b = FORM_CACHE, cos_sin_cache, cos_sin_cache
        V.same_device(q, "q", cos_sin_cache=cos_sin_cache)
    else:
        if cos is None or sin is None:
            raise ValueError("pass cos and sin (or cos_sin_cache with positions)")
        V.float_tensor(cos, "cos")
        V.float_tensor(sin, "sin")
        if cos.shape != sin.shape:
            raise ValueError(f"cos and sin must have the same shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if cos.dtype != sin.dtype:
            raise TypeError(f"cos and sin must have the same dtype; got {cos.dtype} and {sin.dtype}")
        V.same_device(q, "q", cos=cos, sin=sin)
        R, form = _rotary_dim_and_form(cos.shape[-1], D, rotary_dim)
        tab_a, tab_b = cos, sin
        _check_table_rows(cos, B, S, layout, positions is not None)
    if R > D:
        raise ValueError(f"rotary_dim ({R}) must be <= q's head_dim ({D})")
    if positions is not None:
        V.int_tensor(positions, "positions")
        V.same_device(q, "q", positions=positions)
        _check_positions_shape(positions, B, S, layout)
    if k is not None:
        V.same_device(q, "q", k=k)

    if pk is not None:
        # eager, no grad, plain tensors: everything checked above is fixed by pk, and so are
        # the kernel key and choice (until dispatch.clear_memo(), which drops every plan);
        # the positions bounds check reads values and runs on every call
        plan = _CosSinPlan(q, k, tab_a, tab_b, positions, R, form, layout, interleaved, inplace,
                           check_bounds, backend)
        _plans.store(_PLANS, pk, plan, PLAN_CACHE_SIZE)
        return plan.run(q, k, tab_a, tab_b, positions)

    if type(q) is not torch.Tensor:
        from posattn.rope.custom_ops import replicate_like

        tab_a, tab_b, positions = replicate_like(q, tab_a, tab_b, positions)
    if inplace:
        if _use_custom_op(q, k):
            if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
                return _InplaceRope.apply(q, k, tab_a, tab_b, positions, R, form, layout, interleaved,
                                          check_bounds, backend)
            torch.ops.posattn.rope_cos_sin_(q, k, tab_a, tab_b, positions, R, form, layout, interleaved,
                                            False, check_bounds, backend)
        else:
            _launch(q, k, q, k, tab_a, tab_b, positions, R, form, layout, interleaved, False,
                    check_bounds, backend)
        return q, k
    if _use_custom_op(q, k):
        qo, ko = torch.ops.posattn.rope_cos_sin(q, k, tab_a, tab_b, positions, R, form, layout,
                                                interleaved, False, check_bounds, backend)
    else:
        qo, ko = _rope_cos_sin_impl(q, k, tab_a, tab_b, positions, R, form, layout, interleaved,
                                    False, check_bounds, backend)
    return qo, (ko if k is not None else None)


def _use_custom_op(q, k) -> bool:
    """Eager calls that need no autograd skip the custom-op dispatcher (a few microseconds)."""
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor:
        return True
    if k is not None and type(k) is not torch.Tensor:
        return True
    return torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))


def _rotary_dim_and_form(W: int, D: int, rotary_dim: int | None) -> tuple[int, int]:
    if rotary_dim is not None:
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
            raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
        if W == rotary_dim // 2:
            return rotary_dim, FORM_HALF
        if W == rotary_dim:
            return rotary_dim, FORM_FULL
        raise ValueError(f"cos/sin's last dim ({W}) must be rotary_dim/2 ({rotary_dim // 2}) or "
                         f"rotary_dim ({rotary_dim})")
    if W <= 0:
        raise ValueError("cos/sin's last dim must be positive")
    if 2 * W <= D:
        return 2 * W, FORM_HALF
    if W % 2:
        raise ValueError(f"cos/sin's last dim ({W}) is more than half of head_dim ({D}), so it is read as "
                         f"the [.., rotary_dim] duplicated-halves form, which needs an even width")
    return W, FORM_FULL


def _check_table_rows(cos, B, S, layout, has_pos):
    what = "cache rows" if has_pos else ("tokens" if layout == "thd" else "sequence length")
    if cos.dim() == 2:
        if not has_pos and cos.shape[0] != S:
            raise ValueError(f"cos/sin of shape [S, W] must have S = {S} ({what} of q); got {tuple(cos.shape)}")
        return
    if cos.dim() == 3:
        if cos.shape[0] not in (1, B):
            raise ValueError(f"cos/sin of shape [B, S, W] must have B = {B} or 1; got {tuple(cos.shape)}")
        if not has_pos and cos.shape[1] != S:
            raise ValueError(f"cos/sin of shape [B, S, W] must have S = {S} ({what} of q); got {tuple(cos.shape)}")
        return
    raise ValueError(f"cos/sin must be 2-D [S or N, W] or 3-D [B, S or N, W]; got shape {tuple(cos.shape)}")


def _check_qk(q, k, layout):
    want = 3 if layout == "thd" else 4
    if q.dim() != want:
        raise ValueError(f"q must be {want}-D for layout={layout!r}; got shape {tuple(q.shape)}")
    if k is not None:
        if k.dim() != want:
            raise ValueError(f"k must be {want}-D like q for layout={layout!r}; got shape {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k must have q's dtype {q.dtype}; got {k.dtype}")
        qs, ks = _bshd_shape(q, layout), _bshd_shape(k, layout)
        for i, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if qs[i] != ks[i]:
                raise ValueError(f"k's {what} ({ks[i]}) must equal q's ({qs[i]}); "
                                 f"q shape {tuple(q.shape)}, k shape {tuple(k.shape)} (layout={layout!r})")


def _check_positions_shape(positions: torch.Tensor, B: int, S: int, layout: str) -> None:
    shp = tuple(positions.shape)
    if layout == "thd" and shp != (S,):
        _positions_2d(positions, B, S, layout)  # raises the error
    elif layout != "thd" and shp not in ((S,), (B, S), (1, S)):
        _positions_2d(positions, B, S, layout)


def _positions_2d(positions: torch.Tensor, B: int, S: int, layout: str) -> torch.Tensor:
    if layout == "thd":
        if positions.dim() != 1 or positions.shape[0] != S:
            raise ValueError(f"positions must be [T] = [{S}] for layout='thd'; got shape {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 1:
        if positions.shape[0] != S:
            raise ValueError(f"positions of shape [S] must have S = {S} (q's sequence length); "
                             f"got {tuple(positions.shape)}")
        return positions.unsqueeze(0)
    if positions.dim() == 2:
        if tuple(positions.shape) not in ((B, S), (1, S)):
            raise ValueError(f"positions of shape [B, S] must be [{B}, {S}] (or [1, {S}]); "
                             f"got {tuple(positions.shape)}")
        return positions
    raise ValueError(f"positions must be [S] or [B, S] (or [T] for layout='thd'); "
                     f"got {positions.dim()}-D shape {tuple(positions.shape)}")


# ---------------------------------------------------------------------------
# tables -> the four [Bt, N, R/2] views the kernels read (views, never copies)

def _table_views(tab_a, tab_b, R: int, form: int, interleaved: bool, conj: bool):
    h = R // 2
    a = tab_a if tab_a.dim() == 3 else tab_a.unsqueeze(0)
    if form == FORM_CACHE:  # one [N, R] cache: cos then sin
        c1 = c2 = a[..., :h]
        s1 = s2 = a[..., h:]
    else:
        b = tab_b if tab_b.dim() == 3 else tab_b.unsqueeze(0)
        if form == FORM_HALF:
            c1 = c2 = a
            s1 = s2 = b
        elif interleaved:  # [.., R] in repeat_interleave order
            c1, c2, s1, s2 = a[..., 0::2], a[..., 1::2], b[..., 0::2], b[..., 1::2]
        else:  # [.., R] = cat(first-half table, second-half table)
            c1, c2, s1, s2 = a[..., :h], a[..., h:], b[..., :h], b[..., h:]
    if conj:
        # the transpose of [[c1, -s1], [s2, c2]] is [[c1, s2], [-s1, c2]]:
        # the same kernel with the sines swapped and negated
        s1, s2 = s2, s1
    return c1, s1, c2, s2


def _check_positions_in_range(pos2: torch.Tensor, rows: int) -> None:
    if pos2.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(pos2)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"positions must index rows of the cos/sin cache, 0 <= position < {rows}; "
                         f"got a position {bad} (positions span [{lo}, {hi}])")


def _launch(q, k, qo_t, ko_t, tab_a, tab_b, positions, R, form, layout, interleaved, conj, check_bounds,
            backend):
    """Rotate q/k (user layout) into qo_t/ko_t (same shapes; may be q/k themselves)."""
    q4 = _as_bshd(q, layout)
    B, S, HQ, D = q4.shape
    k4 = _as_bshd(k, layout) if k is not None else None
    c1, s1, c2, s2 = _table_views(tab_a, tab_b, R, form, interleaved, conj)
    pos2 = None
    if positions is not None:
        pos2 = _positions_2d(positions, B, S, layout)
        if check_bounds:
            _check_positions_in_range(pos2, c1.shape[1])
    key = _key_for(q, q4, k4, c1, c2, pos2, R, interleaved)
    kernel, config = dispatch.select("rope_cos_sin", key, backend=backend, device_index=q.device.index)

    qi, qo, qback = _io(q4, q4 if qo_t is q else _as_bshd(qo_t, layout))
    ki = ko = kback = None
    if k4 is not None:
        ki, ko, kback = _io(k4, k4 if ko_t is k else _as_bshd(ko_t, layout))
    kernel.fn(qi, qo, ki, ko, c1, s1, c2, s2, pos2, R, bool(interleaved), -1.0 if conj else 1.0, config)
    if qback is not None:
        qback.copy_(qo)
    if kback is not None:
        kback.copy_(ko)


# ---------------------------------------------------------------------------
# the hot path: per-signature plans (eager, no gradient), as for apply_rope
# (posattn/rope/ops.py). The checks, R, the table form, the kernel key and the
# backend choice depend only on metadata (shapes, dtypes, devices, q/k strides),
# the keyword arguments and the backend request; the positions bounds check reads
# values and is never skipped.

_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_ctx_backend = dispatch.context_backend
_env_backend = dispatch.env_backend_raw
_empty_like = torch.empty_like

PLAN_CACHE_SIZE = 512  # signatures kept; the cache is emptied when full (0: no plans)
_PLANS: dict = _plans.new_table()


def clear_plans() -> None:
    """Forget every apply_rope_cos_sin plan (dispatch.clear_memo() does this too)."""
    _PLANS.clear()


def _key_for(q, q4, k4, c1, c2, pos2, R, interleaved) -> CosSinKey:
    B, S, HQ, D = q4.shape
    return CosSinKey(q.device.type, _DTYPE_NAME[q.dtype], _DTYPE_NAME[c1.dtype], D, R, bool(interleaved),
                     c2.data_ptr() != c1.data_ptr(), "" if pos2 is None else _DTYPE_NAME[pos2.dtype], HQ,
                     k4.shape[2] if k4 is not None else 0, token_bucket(B * S))


class _CosSinPlan:
    """What apply_rope_cos_sin does for one checked signature (eager, no grad)."""

    __slots__ = ("kernel", "fn", "config", "R", "form", "layout", "interleaved", "inplace", "check_bounds",
                 "q_copy", "k_copy", "q_out_ok", "k_out_ok", "tab_last", "pos_last", "launch", "simple")

    def __init__(self, q, k, tab_a, tab_b, positions, R, form, layout, interleaved, inplace, check_bounds,
                 backend):
        q4 = _as_bshd(q, layout)
        k4 = _as_bshd(k, layout) if k is not None else None
        c1, s1, c2, s2 = _table_views(tab_a, tab_b, R, form, interleaved, False)
        pos2 = None if positions is None else _positions_2d(positions, q4.shape[0], q4.shape[1], layout)
        self.kernel, self.config = dispatch.select("rope_cos_sin", _key_for(q, q4, k4, c1, c2, pos2, R, interleaved),
                                                   backend=backend, device_index=q.device.index)
        self.fn = self.kernel.fn
        self.R, self.form, self.layout, self.interleaved = R, form, layout, interleaved
        self.inplace, self.check_bounds = inplace, check_bounds
        self.q_copy = q4.stride(-1) != 1   # as _io
        self.k_copy = k4 is not None and k4.stride(-1) != 1
        # out of place: empty_like(q) in q's layout; its [B,S,H,D] view has a contiguous last
        # dim unless q is not dense (then the kernel writes a temporary, copied back as in _io)
        self.q_out_ok = _as_bshd(torch.empty_like(q, device="meta"), layout).stride(-1) == 1
        self.k_out_ok = k is None or _as_bshd(torch.empty_like(k, device="meta"), layout).stride(-1) == 1
        self.simple = (layout == "bshd" and not inplace and not self.q_copy and not self.k_copy
                       and self.q_out_ok and self.k_out_ok)
        self.tab_last = None   # (tab_a, tab_b, their data_ptrs and strides, the four table views)
        self.pos_last = None   # (positions, data_ptr, strides, its [Bp, S] view)
        # launch(qi, qo, ki, ko, (c1, s1, c2, s2), pos2): the kernel prepared for this signature
        # (Kernel.prepare) on the first run, with that run's tensors (later runs' tensors have
        # the same shapes, strides, dtypes and device: the plan's key and the rules above fix
        # them); the tables tuple is the one kept in tab_last while it stays valid
        self.launch = None

    def _prepare(self, qi, qo, ki, ko, tables, pos2):
        fn, R, inter, config = self.fn, self.R, self.interleaved, self.config
        if self.kernel.prepare is not None:
            launch = self.kernel.prepare(qi, qo, ki, ko, *tables, pos2, R, inter, 1.0, config)
        else:
            def launch(qi, qo, ki, ko, tables, pos2):
                fn(qi, qo, ki, ko, *tables, pos2, R, inter, 1.0, config)
        self.launch = launch
        return launch

    def run(self, q, k, tab_a, tab_b, positions):
        # views cost ~2 us each; a model passes the same tables and positions to every layer.
        # A kept view is valid while its source is the same object with the same storage,
        # offset and strides (shapes, dtypes and devices are in the plan's key); the view keeps
        # the old storage alive, so an equal data_ptr cannot belong to new storage.
        last = self.tab_last
        if (last is not None and last[0] is tab_a and last[1] is tab_b and last[2] == tab_a.data_ptr()
                and last[3] == tab_a.stride()
                and (tab_b is tab_a or (last[4] == tab_b.data_ptr() and last[5] == tab_b.stride()))):
            views = last[6]
        else:
            views = _table_views(tab_a, tab_b, self.R, self.form, self.interleaved, False)
            self.tab_last = (tab_a, tab_b, tab_a.data_ptr(), tab_a.stride(), tab_b.data_ptr(), tab_b.stride(),
                             views)
        pos2 = None
        if positions is not None:
            last = self.pos_last
            if (last is not None and last[0] is positions and last[1] == positions.data_ptr()
                    and last[2] == positions.stride()):
                pos2 = last[3]
            else:
                pos2 = positions.unsqueeze(0) if positions.dim() == 1 else positions  # as _positions_2d
                self.pos_last = (positions, positions.data_ptr(), positions.stride(), pos2)
            if self.check_bounds:
                _check_positions_in_range(pos2, views[0].shape[1])
        if self.simple:  # bshd, out of place, last dims contiguous, empty_like keeps them so
            qo = _empty_like(q)
            ko = None if k is None else _empty_like(k)
            (self.launch or self._prepare(q, qo, k, ko, views, pos2))(q, qo, k, ko, views, pos2)
            return qo, ko
        layout = self.layout
        q4, k4 = _as_bshd(q, layout), (_as_bshd(k, layout) if k is not None else None)
        if self.inplace:
            qi = q4.contiguous() if self.q_copy else q4
            ki = k4.contiguous() if self.k_copy else k4
            (self.launch or self._prepare(qi, qi, ki, ki, views, pos2))(qi, qi, ki, ki, views, pos2)
            if self.q_copy:
                q4.copy_(qi)
            if self.k_copy:
                k4.copy_(ki)
            return q, k
        qi = q4.contiguous() if self.q_copy else q4
        qo = _empty_like(q)
        qo4 = qo if layout == "bshd" else _as_bshd(qo, layout)
        qw = qo4 if self.q_out_ok else torch.empty(qo4.shape, dtype=qo4.dtype, device=qo4.device)
        ko = ki = kw = ko4 = None
        if k4 is not None:
            ki = k4.contiguous() if self.k_copy else k4
            ko = _empty_like(k)
            ko4 = ko if layout == "bshd" else _as_bshd(ko, layout)
            kw = ko4 if self.k_out_ok else torch.empty(ko4.shape, dtype=ko4.dtype, device=ko4.device)
        (self.launch or self._prepare(qi, qw, ki, kw, views, pos2))(qi, qw, ki, kw, views, pos2)
        if qw is not qo4:
            qo4.copy_(qw)
        if kw is not ko4:
            ko4.copy_(kw)
        return qo, ko


_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64", torch.int32: "int32", torch.int64: "int64"}


def _io(x4, o4):
    """(kernel input, kernel output, tensor to copy the output back into or None): [B,S,H,D]
    views with a contiguous last dim; copies only when a last dim is not contiguous."""
    xi = x4 if x4.stride(-1) == 1 else x4.contiguous()
    if o4 is x4 or o4.data_ptr() == x4.data_ptr():  # in place
        return xi, xi, (None if xi is x4 else o4)
    if o4.stride(-1) == 1:
        return xi, o4, None
    return xi, torch.empty(o4.shape, dtype=o4.dtype, device=o4.device), o4


def _empty_out(x):
    out = torch.empty_like(x)
    return out


def _rope_cos_sin_impl(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj,
                       check_bounds, backend):
    qo = _empty_out(q)
    ko = _empty_out(k) if k is not None else q.new_empty(0)
    _launch(q, k, qo, ko if k is not None else None, tab_a, tab_b, positions, rotary_dim, form, layout,
            interleaved, conj, check_bounds, backend)
    return qo, ko


# ---------------------------------------------------------------------------
# torch custom ops: out of place (with autograd) and in place

@torch.library.custom_op("posattn::rope_cos_sin", mutates_args=())
def _rope_cos_sin_op(q: torch.Tensor, k: Optional[torch.Tensor], tab_a: torch.Tensor, tab_b: torch.Tensor,
                     positions: Optional[torch.Tensor], rotary_dim: int, form: int, layout: str,
                     interleaved: bool, conj: bool, check_bounds: bool,
                     backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_cos_sin_impl(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj,
                              check_bounds, backend)


@_rope_cos_sin_op.register_fake
def _(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj, check_bounds, backend):
    return torch.empty_like(q), (torch.empty_like(k) if k is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj, check_bounds, backend = inputs
    ctx.save_for_backward(tab_a, tab_b, positions)
    ctx.params = (rotary_dim, form, layout, interleaved, conj, backend)
    ctx.has_k = k is not None


def _backward(ctx, gq, gk):
    tab_a, tab_b, positions = ctx.saved_tensors
    rotary_dim, form, layout, interleaved, conj, backend = ctx.params
    gk_in = gk if ctx.has_k else None
    if gk_in is not None and type(gk_in) is torch.Tensor and type(gq) is not torch.Tensor:
        gk_in = None        # autograd's plain zeros for an unused k output beside DTensors: k's gradient is 0
    # positions were checked (or not) by the forward; the backward does not sync again
    dq, dk = torch.ops.posattn.rope_cos_sin(gq, gk_in, tab_a, tab_b, positions, rotary_dim, form, layout,
                                            interleaved, not conj, False, backend)
    return (dq, dk if gk_in is not None else None) + (None,) * 10


torch.library.register_autograd("posattn::rope_cos_sin", _backward, setup_context=_setup_context)


@torch.library.custom_op("posattn::rope_cos_sin_", mutates_args=("q", "k"))
def _rope_cos_sin_inplace_op(q: torch.Tensor, k: Optional[torch.Tensor], tab_a: torch.Tensor,
                             tab_b: torch.Tensor, positions: Optional[torch.Tensor], rotary_dim: int,
                             form: int, layout: str, interleaved: bool, conj: bool, check_bounds: bool,
                             backend: Optional[str]) -> None:
    _launch(q, k, q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj, check_bounds,
            backend)


@_rope_cos_sin_inplace_op.register_fake
def _(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, conj, check_bounds, backend):
    return None


class _InplaceRope(torch.autograd.Function):
    """In-place rotation that autograd can see through (mark_dirty), like flash-attn's."""

    @staticmethod
    def forward(ctx, q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved, check_bounds,
                backend):
        torch.ops.posattn.rope_cos_sin_(q, k, tab_a, tab_b, positions, rotary_dim, form, layout, interleaved,
                                        False, check_bounds, backend)
        if k is not None:
            ctx.mark_dirty(q, k)
        else:
            ctx.mark_dirty(q)
        ctx.save_for_backward(tab_a, tab_b, positions)
        ctx.params = (rotary_dim, form, layout, interleaved, backend)
        ctx.has_k = k is not None
        return q, k

    @staticmethod
    def backward(ctx, gq, gk):
        tab_a, tab_b, positions = ctx.saved_tensors
        rotary_dim, form, layout, interleaved, backend = ctx.params
        dq, dk = torch.ops.posattn.rope_cos_sin(gq, gk if ctx.has_k else None, tab_a, tab_b, positions,
                                                rotary_dim, form, layout, interleaved, True, False, backend)
        return (dq, dk if ctx.has_k else None) + (None,) * 9


# ---------------------------------------------------------------------------
# kernel registrations: one line per backend

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _cpu_supports(key: CosSinKey):
    if key.device_type != "cpu":
        return False, f"needs CPU tensors, got {key.device_type}"
    if native_kernels._C is None or not hasattr(native_kernels._C, "rope_cos_sin_forward"):
        return False, "posattn._C has no rope_cos_sin_forward (rebuild: python setup.py build_ext --inplace)"
    return (True, "") if key.dtype in _DTYPES else (False, f"dtype {key.dtype}")


def _cuda_supports(key: CosSinKey):
    if key.device_type != "cuda":
        return False, f"needs CUDA tensors, got {key.device_type}"
    if not native_kernels.cuda_built():
        return False, "posattn._cuda has no rope_cos_sin_forward (rebuild with POSATTN_CUDA=1)"
    return (True, "") if key.dtype in _DTYPES else (False, f"dtype {key.dtype}")


@dispatch.explicit_aware
def _triton_supports(key: CosSinKey, explicit: bool = False):
    from posattn.kernels import triton as tk

    why = tk.device_refusal(key.device_type, explicit)
    if why:
        return False, why
    return (True, "") if key.dtype in _DTYPES else (False, f"dtype {key.dtype}")


def _triton_fn(*args):
    from posattn.kernels.triton import rope_cos_sin as tr

    return tr.rope_cos_sin_forward(*args)


def _triton_default(key: CosSinKey):
    from posattn.kernels.triton import rope_cos_sin as tr

    return tr.default_config(key.head_dim, key.rotary_dim, max(key.heads_q, key.heads_k))


dispatch.register("rope_cos_sin", "reference", dtypes=_DTYPES)(ref_kernels.rope_cos_sin_forward)
dispatch.register("rope_cos_sin", "cpu", supports=_cpu_supports,
                  default_config=lambda key: {"threads": 0, "chunk": 16}, dtypes=_DTYPES,
                  search_space=native_kernels.cpu_search_space,
                  prepare=native_kernels.cpu_prepare)(native_kernels.cpu_forward)
dispatch.register("rope_cos_sin", "cuda", supports=_cuda_supports, default_config=lambda key: {"threads": 256},
                  dtypes=_DTYPES, search_space=native_kernels.cuda_search_space)(native_kernels.cuda_forward)
dispatch.register("rope_cos_sin", "triton", supports=_triton_supports, default_config=_triton_default,
                  dtypes=_DTYPES,
                  search_space=lambda key: __import__(  # lazy: importing triton waits for a Triton launch
                      "posattn.kernels.triton.rope_cos_sin", fromlist=["_"]).rope_cos_sin_search_space(key)
                  )(_triton_fn)

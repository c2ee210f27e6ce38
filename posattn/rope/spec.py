"""RopeSpec: what rotary embedding to apply, independent of the inputs."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

import torch

from posattn.rope import scaling as _sc
from posattn.lowered import RopeTables


@dataclass(frozen=True)
class DPE:
    """Dimension-wise positions (DPE, Lu et al. 2025): each group of rotary pairs sees its
    own, coarser positions.

    Group g covers pairs ``[boundaries[g], boundaries[g+1])`` (pair indices, ``0`` first and
    ``rotary_dim/2`` last) and reads ``floor(position / scales[g])``, so that each frequency
    band sees positions within the length it was trained on. Queries additionally add
    ``q_offsets[g]``; :meth:`for_window` sets the offsets DPE uses so that the ``window``
    nearest keys keep their true distances (``window - window / scales[g]``).

    Args:
        boundaries: increasing pair indices, ``(0, b1, ..., rotary_dim/2)``.
        scales: one positive divisor per group (1 leaves a group unchanged for integer positions).
        q_offsets: one query offset per group, or None for no offset.

    Scales and offsets are lowered to fp32 tables (``pair_pos_scale``, ``pair_q_offset``).
    """

    boundaries: tuple[int, ...]
    scales: tuple[float, ...]
    q_offsets: tuple[float, ...] | None = None

    def __post_init__(self):
        b = tuple(self.boundaries) if hasattr(self.boundaries, "__iter__") else self.boundaries
        if not isinstance(b, tuple) or len(b) < 2:
            raise ValueError(f"DPE.boundaries must be a sequence of at least two pair indices, got {self.boundaries!r}")
        for i, v in enumerate(b):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"DPE.boundaries[{i}] must be an int, got {type(v).__name__}")
        if b[0] != 0:
            raise ValueError(f"DPE.boundaries must start at 0, got {b[0]}")
        if any(b1 <= b0 for b0, b1 in zip(b, b[1:])):
            raise ValueError(f"DPE.boundaries must be strictly increasing, got {b}")
        object.__setattr__(self, "boundaries", b)
        scales = _sc._float_tuple(self.scales, "DPE.scales")
        if len(scales) != len(b) - 1:
            raise ValueError(f"DPE.scales must have one entry per group ({len(b) - 1}), got {len(scales)}")
        if any(s <= 0 for s in scales):
            raise ValueError(f"DPE.scales must all be > 0, got {scales}")
        object.__setattr__(self, "scales", scales)
        if self.q_offsets is not None:
            offs = _sc._float_tuple(self.q_offsets, "DPE.q_offsets")
            if len(offs) != len(b) - 1:
                raise ValueError(f"DPE.q_offsets must have one entry per group ({len(b) - 1}), got {len(offs)}")
            object.__setattr__(self, "q_offsets", offs)

    @classmethod
    def for_window(cls, boundaries, scales, window: int) -> "DPE":
        """DPE's query shift for a local window of ``window`` keys: ``window - window / scale``."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int, got {window!r}")
        scales = _sc._float_tuple(scales, "DPE.scales")
        return cls(tuple(boundaries), scales, tuple(window - window / s for s in scales))

    def pair_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pair_pos_scale fp32 [R/2], pair_q_offset fp32 [R/2] or None)."""
        sizes = [b1 - b0 for b0, b1 in zip(self.boundaries, self.boundaries[1:])]
        scale = torch.repeat_interleave(torch.tensor(self.scales, dtype=torch.float32), torch.tensor(sizes))
        if self.q_offsets is None:
            return scale, None
        return scale, torch.repeat_interleave(torch.tensor(self.q_offsets, dtype=torch.float32), torch.tensor(sizes))


@dataclass(frozen=True)
class RopeSpec:
    """A rotary position embedding.

    Args:
        head_dim: size D of each head.
        rotary_dim: leading dims of each head that are rotated (even, <= head_dim);
            the rest pass through unchanged. Default: head_dim.
        base: the frequency base theta; ``inv_freq[p] = base ** (-2p / rotary_dim)``.
        interleaved: pair (2p, 2p+1) (GPT-J style) instead of (p, p + rotary_dim/2)
            (GPT-NeoX / Llama style, transformers' ``rotate_half``).
        scaling: how the frequencies are derived (``posattn.rope.scaling``: Linear, NTK,
            DynamicNTK, YaRN, Llama3, LongRoPE, Custom), or None for ``base ** (-2p/R)``.
        mrope_section: multi-axis positions (Qwen2-VL M-RoPE, 3-D video RoPE): the number
            of rotary pairs that read each positions axis; positions then carry
            ``len(mrope_section)`` axes (``[n_axes, ...]``) and the sections sum to
            ``rotary_dim/2``. Contiguous (default): pairs ``[s0+...+s(a-1), s0+...+sa)``
            read axis ``a`` (Qwen2-VL / Qwen2.5-VL, whose ``mrope_section`` is in pairs,
            e.g. ``(16, 24, 24)`` for head_dim 128).
        mrope_interleaved: Qwen3-VL's assignment instead: pair ``p`` reads axis
            ``a = p % n_axes`` when ``a > 0`` and ``p < n_axes * mrope_section[a]``, else
            axis 0 (so ``mrope_section[0]`` is what is left over).
        dpe: dimension-wise positions (:class:`DPE`), or None.

    ``seq_len`` (for ``inv_freq``/``tables``) matters only when ``depends_on_seq_len``
    (DynamicNTK, LongRoPE): it is transformers' run-time length, ``max(position_ids) + 1``;
    None means the tables transformers builds at initialisation. See the scaling classes.
    """

    head_dim: int
    rotary_dim: int | None = None
    base: float = 10000.0
    interleaved: bool = False
    scaling: _sc._Scaling | None = None
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    dpe: DPE | None = None

    def __post_init__(self):
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int):
            raise TypeError(f"RopeSpec.head_dim must be an int, got {type(self.head_dim).__name__}")
        if self.head_dim <= 0:
            raise ValueError(f"RopeSpec.head_dim must be positive, got {self.head_dim}")
        rd = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if isinstance(rd, bool) or not isinstance(rd, int):
            raise TypeError(f"RopeSpec.rotary_dim must be an int or None, got {type(rd).__name__}")
        if rd <= 0 or rd % 2:
            raise ValueError(f"RopeSpec.rotary_dim must be a positive even number, got {rd}")
        if rd > self.head_dim:
            raise ValueError(f"RopeSpec.rotary_dim ({rd}) must be <= head_dim ({self.head_dim})")
        object.__setattr__(self, "rotary_dim", rd)
        if not isinstance(self.base, (int, float)) or isinstance(self.base, bool):
            raise TypeError(f"RopeSpec.base must be a number, got {type(self.base).__name__}")
        if not math.isfinite(self.base) or self.base <= 1.0:
            raise ValueError(f"RopeSpec.base must be a finite number > 1, got {self.base}")
        object.__setattr__(self, "base", float(self.base))
        if not isinstance(self.interleaved, bool):
            raise TypeError(f"RopeSpec.interleaved must be a bool, got {type(self.interleaved).__name__}")
        if self.scaling is not None:
            if not isinstance(self.scaling, _sc._Scaling):
                raise TypeError("RopeSpec.scaling must be None or one of posattn.rope.scaling's "
                                f"{', '.join(c.__name__ for c in _sc.SCALINGS)}; got {type(self.scaling).__name__}")
            self.scaling.check(rd)
        self._check_mrope(rd)
        if self.dpe is not None:
            if not isinstance(self.dpe, DPE):
                raise TypeError(f"RopeSpec.dpe must be None or a posattn.rope.DPE, got {type(self.dpe).__name__}")
            if self.dpe.boundaries[-1] != rd // 2:
                raise ValueError(f"RopeSpec.dpe.boundaries must end at rotary_dim/2 = {rd // 2}, "
                                 f"got {self.dpe.boundaries[-1]}")
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))

    def __hash__(self):  # a spec is a cache key on every op call: hash it once
        return self._hash

    def __reduce__(self):  # rebuild (and re-hash) on unpickling: hash(None) differs between processes
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def _check_mrope(self, rd):
        if not isinstance(self.mrope_interleaved, bool):
            raise TypeError(f"RopeSpec.mrope_interleaved must be a bool, got {type(self.mrope_interleaved).__name__}")
        sec = self.mrope_section
        if sec is None:
            if self.mrope_interleaved:
                raise ValueError("RopeSpec.mrope_interleaved=True needs mrope_section")
            return
        if isinstance(sec, torch.Tensor):
            sec = sec.tolist()
        if isinstance(sec, (str, bytes)) or not hasattr(sec, "__iter__"):
            raise TypeError(f"RopeSpec.mrope_section must be a sequence of ints, got {type(sec).__name__}")
        sec = tuple(sec)
        for i, v in enumerate(sec):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"RopeSpec.mrope_section[{i}] must be an int, got {type(v).__name__}")
            if v < 0:
                raise ValueError(f"RopeSpec.mrope_section[{i}] must be >= 0, got {v}")
        if len(sec) < 1:
            raise ValueError("RopeSpec.mrope_section must name at least one axis")
        if sum(sec) != rd // 2:
            raise ValueError(f"RopeSpec.mrope_section {sec} must sum to rotary_dim/2 = {rd // 2} "
                             f"(sections count rotary pairs), got {sum(sec)}")
        if self.mrope_interleaved:
            n = len(sec)
            for a in range(1, n):
                # axis a takes pairs a, a+n, ..., a+n*(s_a-1): all must exist
                if sec[a] and a + n * (sec[a] - 1) >= rd // 2:
                    raise ValueError(f"RopeSpec.mrope_section {sec}: interleaved axis {a} needs pairs up to "
                                     f"{a + n * (sec[a] - 1)}, but there are only {rd // 2}")
        object.__setattr__(self, "mrope_section", sec)

    # ------------------------------------------------------------------ derived

    @property
    def n_axes(self) -> int:
        """How many positions axes the spec reads (1 without mrope_section)."""
        return 1 if self.mrope_section is None else len(self.mrope_section)

    @property
    def inv_freq_heads(self) -> int | None:
        """H when the frequencies are per head (Custom with [H, R/2]), else None."""
        return self.scaling.heads if isinstance(self.scaling, _sc.Custom) else None

    @property
    def attention_scaling(self) -> float:
        """Factor cos and sin are multiplied by (1.0 without scaling)."""
        return 1.0 if self.scaling is None else float(self.scaling.attention_scaling)

    @property
    def depends_on_seq_len(self) -> bool:
        """Whether the tables change with the sequence length (dynamic NTK, LongRoPE)."""
        return self.scaling is not None and self.scaling.depends_on_seq_len

    def _check_seq_len(self, seq_len):
        if seq_len is None:
            return
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f"seq_len must be an int or None, got {type(seq_len).__name__}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        """fp32 [rotary_dim/2] (or [H, rotary_dim/2]) on the CPU, computed exactly as transformers does.

        ``seq_len = max(position_ids) + 1`` for DynamicNTK and LongRoPE; ignored otherwise.
        """
        self._check_seq_len(seq_len)
        if self.scaling is None:
            return _sc._default_inv_freq(self.base, self.rotary_dim)
        return self.scaling.compute_inv_freq(self.base, self.rotary_dim, seq_len).contiguous()

    def pair_axis(self) -> torch.Tensor | None:
        """int32 [rotary_dim/2]: the positions axis each rotary pair reads (None for one axis)."""
        if self.mrope_section is None:
            return None
        sec, half = self.mrope_section, self.rotary_dim // 2
        if not self.mrope_interleaved:
            return torch.repeat_interleave(torch.arange(len(sec), dtype=torch.int32), torch.tensor(sec))
        n = len(sec)
        axis = torch.zeros(half, dtype=torch.int32)
        for a in range(1, n):
            axis[a: n * sec[a]: n] = a
        return axis

    def _seq_key(self, seq_len):
        return self.scaling.seq_len_key(seq_len) if self.depends_on_seq_len else None

    def tables(self, device=None, seq_len: int | None = None):
        """The lowered tables (posattn.lowered.RopeTables) on ``device``, cached per
        (spec, device, what of seq_len the tables depend on).

        Under torch.compile the tables are built (or found) eagerly at trace time and enter
        the graph as constants, so a spec used for the first time inside a compiled
        function traces (fullgraph=True) and gets the very tables an eager call gets."""
        if seq_len is not None:
            self._check_seq_len(seq_len)
        # the key is built without constructing a torch.device: this runs on every op call
        # (a torch.device hashes fast; str(device) would cost microseconds)
        dev_key = "cpu" if device is None else device
        if _is_compiling():
            return _tables_at_trace_time(self, dev_key, seq_len)
        t = _INV_FREQ_CACHE.get(("tables", self, dev_key, self._seq_key(seq_len)))
        return t if t is not None else _build_tables(self, dev_key, seq_len)

    @classmethod
    def from_hf_config(cls, config, *, layer_type: str | None = None, interleaved: bool | None = None) -> "RopeSpec":
        """The spec of a transformers model config (see :func:`posattn.rope.hf.from_hf_config`)."""
        from posattn.rope.hf import from_hf_config

        return from_hf_config(config, layer_type=layer_type, interleaved=interleaved)


_INV_FREQ_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_is_compiling = torch.compiler.is_compiling


def _build_tables(spec: RopeSpec, dev_key, seq_len):
    """Build spec's RopeTables on ``dev_key`` (a device or its name) and cache them (eager only:
    the lock is what Dynamo cannot trace)."""
    key = ("tables", spec, dev_key, spec._seq_key(seq_len))
    t = _INV_FREQ_CACHE.get(key)
    if t is None:
        scale, offset = spec.dpe.pair_tables() if spec.dpe is not None else (None, None)
        t = RopeTables(spec.inv_freq(seq_len), spec.attention_scaling, spec.pair_axis(), spec.n_axes,
                       scale, offset).to(torch.device(dev_key))
        with _CACHE_LOCK:
            if len(_INV_FREQ_CACHE) > 256:
                _INV_FREQ_CACHE.clear()
            _INV_FREQ_CACHE[key] = t
    return t


def _tables_at_trace_time(spec: RopeSpec, dev_key, seq_len):
    """What RopeSpec.tables returns, for a compiled caller. Dynamo calls this at trace time
    with the real arguments instead of tracing it (so neither the cache's lock nor the table
    construction is traced) and keeps the result as a constant of the graph, guarded on the
    spec's identity. Correct because the tables are a pure function of (spec, device, seq_len)."""
    t = _INV_FREQ_CACHE.get(("tables", spec, dev_key, spec._seq_key(seq_len)))
    return t if t is not None else _build_tables(spec, dev_key, seq_len)


# what @torch._dynamo.assume_constant_result does, without importing torch._dynamo here (seconds
# at `import posattn`); tests/rope/test_compile_first_use.py fails if the marker stops working
_tables_at_trace_time._dynamo_marked_constant = True

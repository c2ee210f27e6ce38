"""Rotary frequency scalings: how a RopeSpec's inv_freq and attention_scaling are derived.

Each scaling is a frozen, hashable dataclass (numbers and tuples only, so equal
scalings hash equal). ``RopeSpec(..., scaling=S)`` asks ``S`` for

    S.compute_inv_freq(base, rotary_dim, seq_len) -> fp32 [rotary_dim/2] (Custom: also [H, rotary_dim/2])
    S.attention_scaling                   -> the factor cos and sin are multiplied by

Every formula below is evaluated with the same fp32 torch operations, in the
same order, as transformers' ``ROPE_INIT_FUNCTIONS`` (transformers 5.23), on
the CPU, so that the tables are bitwise equal to transformers' for the same
config (tests/rope/test_scaling.py checks this).

``seq_len`` (only DynamicNTK and LongRoPE read it) is the length the model is
attending over, as transformers counts it at run time: ``max(position_ids) + 1``.
``None`` means "not known / at initialisation", which gives the tables
transformers builds when the model is created.

=============  ======================  ==========================================
scaling        transformers rope_type  source
=============  ======================  ==========================================
(none)         "default"               RoFormer (Su et al., 2021)
Linear         "linear"                Position Interpolation (Chen et al., 2023)
NTK            (none; "dynamic" form)  NTK-aware scaled RoPE (bloc97, 2023)
DynamicNTK     "dynamic"               Dynamic NTK (emozilla, 2023)
YaRN           "yarn"                  YaRN (Peng et al., 2023); DeepSeek-V2 mscale
Llama3         "llama3"                Llama 3.1 (Meta, 2024)
LongRoPE       "longrope"              LongRoPE (Ding et al., 2024), Phi-3
Custom         (none; "proportional")  learned / ODE frequencies (CLEX, Chen et al., 2023)
=============  ======================  ==========================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Linear", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE", "Custom", "SCALINGS"]


def _num(value, name: str, *, positive: bool = True, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """base ** (-2p / dim) in fp32, exactly as transformers computes it."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


class _Scaling:
    """Common interface. Subclasses are frozen dataclasses."""

    rope_type: ClassVar[str | None] = None  # transformers' name, None when it has none
    depends_on_seq_len: ClassVar[bool] = False

    def compute_inv_freq(self, base: float, rotary_dim: int, seq_len: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def attention_scaling(self) -> float:
        return 1.0

    def check(self, rotary_dim: int) -> None:
        """Validation that needs the spec's rotary_dim (raises ValueError)."""

    def seq_len_key(self, seq_len: int | None):
        """What of seq_len the tables depend on (a cache key): None when nothing."""
        return None


@dataclass(frozen=True)
class Linear(_Scaling):
    """Position interpolation: every frequency divided by ``factor`` (positions squeezed by it)."""

    factor: float
    rope_type: ClassVar[str] = "linear"

    def __post_init__(self):
        object.__setattr__(self, "factor", _num(self.factor, "Linear.factor"))

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        inv_freq = _default_inv_freq(base, rotary_dim)
        inv_freq /= self.factor
        return inv_freq


@dataclass(frozen=True)
class NTK(_Scaling):
    """Fixed NTK-aware scaling: the base becomes ``base * factor ** (R / (R - 2))`` (R = rotary_dim).

    It is dynamic NTK frozen at one scale (transformers has no rope_type for it; its
    "dynamic" type at ``seq_len = max_position * (factor + f - 1) / f`` gives the same table).
    """

    factor: float
    rope_type: ClassVar[None] = None

    def __post_init__(self):
        object.__setattr__(self, "factor", _num(self.factor, "NTK.factor"))

    def check(self, rotary_dim):
        if rotary_dim <= 2:
            raise ValueError(f"NTK scaling needs rotary_dim > 2 (its exponent is R/(R-2)), got {rotary_dim}")

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        base = base * self.factor ** (rotary_dim / (rotary_dim - 2))
        return _default_inv_freq(base, rotary_dim)


@dataclass(frozen=True)
class DynamicNTK(_Scaling):
    """Dynamic NTK scaling (transformers "dynamic"): the base grows with the sequence length.

    With ``L = max(seq_len, original_max_position)`` (``seq_len = max(position_ids) + 1``,
    None meaning ``original_max_position``), the base is
    ``base * (factor * L / original_max_position - (factor - 1)) ** (R / (R - 2))``;
    up to ``original_max_position`` the table is the unscaled one.

    ``original_max_position`` is transformers' ``config.max_position_embeddings``.
    transformers' module also keeps the largest table it has built so far until the
    length drops back to the original; a caller reproduces that by passing the running
    maximum of ``seq_len``.
    """

    factor: float
    original_max_position: int
    rope_type: ClassVar[str] = "dynamic"
    depends_on_seq_len: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "factor", _num(self.factor, "DynamicNTK.factor"))
        _int(self.original_max_position, "DynamicNTK.original_max_position")

    def check(self, rotary_dim):
        if rotary_dim <= 2:
            raise ValueError(f"DynamicNTK scaling needs rotary_dim > 2 (its exponent is R/(R-2)), got {rotary_dim}")

    def seq_len_key(self, seq_len):
        if seq_len is None or seq_len <= self.original_max_position:
            return None
        return seq_len

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        omp = self.original_max_position
        seq_len = omp if seq_len is None else max(seq_len, omp)
        base = base * ((self.factor * seq_len / omp) - (self.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _default_inv_freq(base, rotary_dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class YaRN(_Scaling):
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp in between.

    Pairs whose wavelength completes more than ``beta_fast`` turns over
    ``original_max_position`` keep their frequency, those with fewer than ``beta_slow``
    turns are divided by ``factor``, with a linear ramp over pair indices between
    (the ramp bounds rounded outwards when ``truncate``).

    attention_scaling: ``attention_factor`` when given; else, when both ``mscale`` and
    ``mscale_all_dim`` are non-zero (DeepSeek-V2/V3 form),
    ``m(factor, mscale) / m(factor, mscale_all_dim)``; else ``m(factor, 1)``, with
    ``m(s, k) = 0.1 k ln(s) + 1`` (1 for s <= 1).
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: ClassVar[str] = "yarn"

    def __post_init__(self):
        object.__setattr__(self, "factor", _num(self.factor, "YaRN.factor"))
        _int(self.original_max_position, "YaRN.original_max_position")
        object.__setattr__(self, "beta_fast", _num(self.beta_fast, "YaRN.beta_fast"))
        object.__setattr__(self, "beta_slow", _num(self.beta_slow, "YaRN.beta_slow"))
        object.__setattr__(self, "mscale", _num(self.mscale, "YaRN.mscale", positive=False, allow_none=True))
        object.__setattr__(self, "mscale_all_dim",
                           _num(self.mscale_all_dim, "YaRN.mscale_all_dim", positive=False, allow_none=True))
        object.__setattr__(self, "attention_factor",
                           _num(self.attention_factor, "YaRN.attention_factor", allow_none=True))
        if not isinstance(self.truncate, bool):
            raise TypeError(f"YaRN.truncate must be a bool, got {type(self.truncate).__name__}")

    @property
    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return float(_yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim))
        return _yarn_mscale(self.factor)

    def correction_range(self, base: float, rotary_dim: int) -> tuple[float, float]:
        """(low, high) pair indices of the ramp."""
        def dim_for(turns):
            return (rotary_dim * math.log(self.original_max_position / (turns * 2 * math.pi))) / (2 * math.log(base))

        low, high = dim_for(self.beta_fast), dim_for(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        # transformers clamps to dim - 1 (not dim/2 - 1); kept for identical tables
        return max(low, 0), min(high, rotary_dim - 1)

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        pos_freqs = base ** (torch.arange(0, rotary_dim, 2).to(dtype=torch.float) / rotary_dim)
        inv_freq_extrapolation = 1.0 / pos_freqs
        inv_freq_interpolation = 1.0 / (self.factor * pos_freqs)
        low, high = self.correction_range(base, rotary_dim)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        return inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation


@dataclass(frozen=True)
class Llama3(_Scaling):
    """Llama 3.1 scaling: wavelengths above ``original_max_position / low_freq_factor`` are
    divided by ``factor``, those below ``original_max_position / high_freq_factor`` kept,
    and a smooth blend in between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self):
        object.__setattr__(self, "factor", _num(self.factor, "Llama3.factor"))
        object.__setattr__(self, "low_freq_factor", _num(self.low_freq_factor, "Llama3.low_freq_factor"))
        object.__setattr__(self, "high_freq_factor", _num(self.high_freq_factor, "Llama3.high_freq_factor"))
        _int(self.original_max_position, "Llama3.original_max_position")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"Llama3.high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor})")

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        inv_freq = _default_inv_freq(base, rotary_dim)
        factor, lo, hi = self.factor, self.low_freq_factor, self.high_freq_factor
        old_context_len = self.original_max_position
        low_freq_wavelen = old_context_len / lo
        high_freq_wavelen = old_context_len / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


def _float_tuple(values, name: str) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = tuple(values)
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}[{i}] must be a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite, got {v}")
    return tuple(float(v) for v in out)


@dataclass(frozen=True)
class LongRoPE(_Scaling):
    """LongRoPE (Phi-3): per-pair rescale factors, ``inv_freq[p] = base ** (-2p/R) / ext[p]``.

    ``ext`` is ``long_factor`` when ``seq_len > original_max_position`` (``seq_len =
    max(position_ids) + 1``, as transformers decides per forward), else ``short_factor``
    (also when ``seq_len`` is None).

    attention_scaling: ``attention_factor`` when given; else, with ``factor`` (transformers
    uses ``max_position_embeddings / original_max_position_embeddings`` when the config has
    none), ``sqrt(1 + ln(factor) / ln(original_max_position))`` for factor > 1, else 1.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: int
    attention_factor: float | None = None
    factor: float | None = None
    rope_type: ClassVar[str] = "longrope"
    depends_on_seq_len: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "short_factor", _float_tuple(self.short_factor, "LongRoPE.short_factor"))
        object.__setattr__(self, "long_factor", _float_tuple(self.long_factor, "LongRoPE.long_factor"))
        _int(self.original_max_position, "LongRoPE.original_max_position")
        object.__setattr__(self, "attention_factor",
                           _num(self.attention_factor, "LongRoPE.attention_factor", allow_none=True))
        object.__setattr__(self, "factor", _num(self.factor, "LongRoPE.factor", allow_none=True))
        for name in ("short_factor", "long_factor"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"LongRoPE.{name} entries must be > 0")

    def check(self, rotary_dim):
        for name in ("short_factor", "long_factor"):
            n = len(getattr(self, name))
            if n != rotary_dim // 2:
                raise ValueError(f"LongRoPE.{name} must have rotary_dim/2 = {rotary_dim // 2} entries, got {n}")

    @property
    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor is None or self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))

    def seq_len_key(self, seq_len):
        return "long" if seq_len is not None and seq_len > self.original_max_position else None

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        use_long = bool(seq_len) and seq_len > self.original_max_position
        ext = torch.tensor(self.long_factor if use_long else self.short_factor, dtype=torch.float32)
        shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (ext * base ** shape)


@dataclass(frozen=True)
class Custom(_Scaling):
    """Given frequencies: learned, ODE-derived (CLEX) or any other table.

    ``inv_freq``: ``rotary_dim/2`` numbers, or ``H`` rows of them (one table per head;
    a tensor or nested sequences are accepted and stored as tuples of floats so that
    equal tables hash equal). They are rounded to fp32 at lowering. ``base`` is not used.
    """

    inv_freq: tuple
    attention_factor: float = 1.0
    rope_type: ClassVar[None] = None

    def __post_init__(self):
        table = self.inv_freq
        if isinstance(table, torch.Tensor):
            if table.dim() not in (1, 2):
                raise ValueError(f"Custom.inv_freq must be 1-D [R/2] or 2-D [H, R/2], got shape {tuple(table.shape)}")
            table = table.detach().cpu().tolist()
        if isinstance(table, (str, bytes)) or not hasattr(table, "__iter__"):
            raise TypeError(f"Custom.inv_freq must be a sequence, got {type(table).__name__}")
        table = tuple(table)
        if not table:
            raise ValueError("Custom.inv_freq must not be empty")
        if all(hasattr(r, "__iter__") and not isinstance(r, (str, bytes)) for r in table):
            rows = tuple(_float_tuple(r, f"Custom.inv_freq[{h}]") for h, r in enumerate(table))
            if len({len(r) for r in rows}) != 1:
                raise ValueError(f"Custom.inv_freq rows must all have the same length, got {[len(r) for r in rows]}")
            table = rows
        else:
            table = _float_tuple(table, "Custom.inv_freq")
        object.__setattr__(self, "inv_freq", table)
        object.__setattr__(self, "attention_factor", _num(self.attention_factor, "Custom.attention_factor"))
        object.__setattr__(self, "_hash", hash((table, self.attention_factor)))

    def __hash__(self):  # tables can be large: hash once
        return self._hash

    def __reduce__(self):  # rebuild (and re-hash) on unpickling
        return type(self), (self.inv_freq, self.attention_factor)

    @property
    def heads(self) -> int | None:
        """H for a per-head table, None for one shared table."""
        return len(self.inv_freq) if isinstance(self.inv_freq[0], tuple) else None

    @property
    def pairs(self) -> int:
        return len(self.inv_freq[0]) if self.heads is not None else len(self.inv_freq)

    def check(self, rotary_dim):
        if self.pairs != rotary_dim // 2:
            raise ValueError(f"Custom.inv_freq must have rotary_dim/2 = {rotary_dim // 2} entries per row, "
                             f"got {self.pairs}")

    @property
    def attention_scaling(self) -> float:
        return self.attention_factor

    def compute_inv_freq(self, base, rotary_dim, seq_len=None):
        return torch.tensor(self.inv_freq, dtype=torch.float32)


SCALINGS = (Linear, NTK, DynamicNTK, YaRN, Llama3, LongRoPE, Custom)

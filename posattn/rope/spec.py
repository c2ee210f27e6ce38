"""RopeSpec: what rotary embedding to apply, independent of the inputs."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch


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
    """

    head_dim: int
    rotary_dim: int | None = None
    base: float = 10000.0
    interleaved: bool = False

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

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        """fp32 [rotary_dim/2] on the CPU, computed exactly as transformers does."""
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).to(torch.float32) / self.rotary_dim
        return 1.0 / (self.base ** exps)

    @property
    def attention_scaling(self) -> float:
        """Factor cos and sin are multiplied by (1.0 without scaling)."""
        return 1.0

    @property
    def depends_on_seq_len(self) -> bool:
        """Whether the tables change with the sequence length (dynamic NTK, LongRoPE)."""
        return False

    def tables(self, device=None, seq_len: int | None = None):
        """The lowered tables (posattn.rope.lowering.RopeTables) on ``device``, cached."""
        from posattn.rope.lowering import RopeTables

        device = torch.device("cpu") if device is None else torch.device(device)
        key = ("tables", self, str(device), seq_len)
        t = _INV_FREQ_CACHE.get(key)
        if t is None:
            t = RopeTables(self.inv_freq(seq_len), self.attention_scaling).to(device)
            with _CACHE_LOCK:
                if len(_INV_FREQ_CACHE) > 256:
                    _INV_FREQ_CACHE.clear()
                _INV_FREQ_CACHE[key] = t
        return t

    def inv_freq_on(self, device: torch.device, seq_len: int | None = None) -> torch.Tensor:
        """inv_freq on ``device``, cached per (spec, device)."""
        key = (self, str(device), seq_len)
        t = _INV_FREQ_CACHE.get(key)
        if t is None:
            t = self.inv_freq(seq_len).to(device=device, dtype=torch.float32).contiguous()
            with _CACHE_LOCK:
                if len(_INV_FREQ_CACHE) > 256:
                    _INV_FREQ_CACHE.clear()
                _INV_FREQ_CACHE[key] = t
        return t


_INV_FREQ_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()

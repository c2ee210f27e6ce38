"""posattn: position-aware attention kernels.

Public API (re-exported here; nothing else lives in this file).
"""
from posattn._version import __version__
from posattn.dispatch import use_backend
from posattn.rope import RopeSpec, apply_rope
from posattn.rope import DPE, NTK, Custom, DynamicNTK, Linear, Llama3, LongRoPE, YaRN
from posattn import autotune as _autotune  # noqa: E402,F401  installs dispatch's tuned-config lookups (POSATTN_AUTOTUNE)

__all__ = ["__version__", "RopeSpec", "apply_rope", "use_backend",
           "DPE", "Linear", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE", "Custom"]
from posattn.rope.cos_sin import apply_rope_cos_sin  # noqa: E402

__all__ += ["apply_rope_cos_sin"]
from posattn.attention import MaskSpec, anchor_attention  # noqa: E402

__all__ += ["MaskSpec", "anchor_attention"]
from posattn.rope import apply_rope_angles, rope_shift  # noqa: E402

__all__ += ["apply_rope_angles", "rope_shift"]
from posattn.decode import decode_attention  # noqa: E402

__all__ += ["decode_attention"]
from posattn.decode.cache import rope_and_cache  # noqa: E402
from posattn.decode.compact import kv_compact  # noqa: E402

__all__ += ["rope_and_cache", "kv_compact"]
from posattn import select  # noqa: E402  token selection (posattn.select.topk, ...)

__all__ += ["select"]
from posattn.position_maps import LeakyReRoPE, ReRoPE, SelfExtend, VistaRoPE  # noqa: E402

__all__ += ["ReRoPE", "LeakyReRoPE", "SelfExtend", "VistaRoPE"]
from posattn import vq  # noqa: E402  query-aware vector quantization (posattn.vq.fit, ...)

__all__ += ["vq"]

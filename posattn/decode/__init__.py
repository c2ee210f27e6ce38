"""The decode engine: attention of a step's new tokens over a (paged) KV cache, and its cache writes."""
from posattn.decode.attention import DecodeKey, decode_attention
from posattn.decode import backends as _backends  # noqa: F401  registers the kernels
from posattn.decode.cache import rope_and_cache
from posattn.decode.compact import kv_compact

__all__ = ["DecodeKey", "decode_attention", "rope_and_cache", "kv_compact"]

"""The decode engine: attention of a step's new tokens over a (paged) KV cache."""
from posattn.decode.attention import DecodeKey, decode_attention
from posattn.decode import backends as _backends  # noqa: F401  registers the kernels

__all__ = ["DecodeKey", "decode_attention"]

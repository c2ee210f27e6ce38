"""The decode engine: decode_attention over a paged KV cache, and its cache writes."""
from posattn.decode.cache import kv_compact, rope_and_cache  # noqa: F401

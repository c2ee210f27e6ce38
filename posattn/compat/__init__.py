"""Signature-compatible entry points: change one import, keep every argument.

    posattn.compat.transformers  apply_rotary_pos_emb (+ Qwen2-VL's multimodal and vision variants)
    posattn.compat.flash_attn    apply_rotary_emb
    posattn.compat.flashinfer    apply_rope*, apply_llama31_rope*, apply_rope_with_cos_sin_cache*
    posattn.compat.vllm          rotary_embedding

Each door maps the foreign signature onto posattn's public ops (never onto a
kernel), so every door gets dispatch, validation and every backend, CPU
tensors included. None of these libraries needs to be installed.
"""
from posattn.compat import flash_attn, flashinfer, transformers, vllm

__all__ = ["flash_attn", "flashinfer", "transformers", "vllm"]

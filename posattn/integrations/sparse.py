"""Sparse decode for transformers models: each decode step (one new token) of every attention layer
attends only to the tokens a selection policy chooses, on posattn's decode engine.

    from posattn.integrations.transformers import apply_sparse_decode
    handle = apply_sparse_decode(model, posattn.select.Quest(budget=2048, page_size=16))
    model.generate(...)
    handle.remove()

How: a posattn attention function is registered with transformers' AttentionInterface and set on
the model (``set_attn_implementation``). Prefill (more than one query token) and calls with an
attention mask (padded batches) run the model's original implementation, densely. A decode step
reads HF's cache [B, Hk, S, D] as the engine's contiguous cache [B, S, Hk, D] (a strided view, no
copy); the slots before the new token are selectable, the new token is always attended.
Llama, Mistral and Qwen2 (their attention modules take the interface).
"""
from __future__ import annotations

import torch

SUPPORTED = ("llama", "mistral", "qwen2")
_NAME = "posattn_sparse"
_registered = False


def _register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(_NAME, _attention)
    AttentionMaskInterface.register(_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def _original(name):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else sdpa_attention_forward


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, q_len, D], key/value [B, Hk, S, D] (the whole cache, new token last) ->
    ([B, q_len, Hq, D], None)."""
    import posattn

    st = getattr(module, "_posattn_sparse", None)
    if st is None or query.shape[2] != 1 or attention_mask is not None or key.shape[2] < 2:
        handle = st.handle if st is not None else None
        if handle is not None and query.shape[2] > 1 and hasattr(handle.policy, "observe_prefill"):
            handle.policy.observe_prefill(st.layer, query, key, getattr(module, "config", None))   # A2ATS's fit
        if handle is not None and query.shape[2] == 1 and attention_mask is not None:
            handle.dense_steps += 1
        fn = _original(handle.original if handle is not None else "sdpa")
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    B, HQ, _, D = query.shape
    S = key.shape[2]
    scale = float(scaling) if scaling is not None else D ** -0.5
    q = query[:, :, 0, :]                                              # [B, Hq, D]
    k_cache, v_cache = key.transpose(1, 2), value.transpose(1, 2)       # [B, S, Hk, D] views
    cs = torch.full((B,), S - 1, dtype=torch.int32, device=query.device)
    idx = st.handle.policy.select(st.layer, q, k_cache, cs, scale)
    # the new token (slot S-1) goes in as this step's k/v: the engine writes it back to the same
    # slot (identical values; cloned so that no tensor is read and written through two views)
    k_new = k_cache[:, S - 1:].clone()
    v_new = v_cache[:, S - 1:].clone()
    out = posattn.decode_attention(q[:, None], k_cache, v_cache, cs, k=k_new, v=v_new, softmax_scale=scale,
                                   kv_indices=idx)
    st.handle.sparse_steps += 1
    return out, None                                                   # [B, 1, Hq, D]


class _LayerState:
    def __init__(self, handle, layer):
        self.handle, self.layer = handle, layer


class SparseDecodeHandle:
    """What :func:`apply_sparse_decode` changed; ``remove()`` undoes it (idempotent).
    ``sparse_steps`` / ``dense_steps``: layer calls that ran sparse, and decode calls that ran
    dense because of an attention mask."""

    def __init__(self, model, policy, original, layers):
        self.model, self.policy, self.original, self.layers = model, policy, original, layers
        self.sparse_steps = 0
        self.dense_steps = 0
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for m in self.layers:
            if getattr(m, "_posattn_sparse", None) is not None and m._posattn_sparse.handle is self:
                del m._posattn_sparse
        self.model.set_attn_implementation(self.original)
        if getattr(self.model, "_posattn_sparse_handle", None) is self:
            del self.model._posattn_sparse_handle
        self.active = False

    def __repr__(self):
        return f"SparseDecodeHandle(policy={type(self.policy).__name__}, active={self.active})"


def apply_sparse_decode(model, policy) -> SparseDecodeHandle:
    """Make ``model``'s decode steps (one new token) attend only to ``policy``'s chosen tokens;
    prefill stays dense. ``policy``: posattn.select.Quest, TidalDecode or TokenSelect (anything
    with ``select(layer, q, k_cache, cache_seqlens, scale)`` and ``reset()``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not callable(getattr(policy, "select", None)) or not callable(getattr(policy, "reset", None)):
        raise TypeError(f"policy must be a posattn.select policy (Quest, TidalDecode, TokenSelect); got "
                        f"{type(policy).__name__}")
    if getattr(model, "_posattn_sparse_handle", None) is not None:
        raise ValueError("this model already has sparse decode applied; remove() it first")
    layers = []
    for m in model.modules():
        parts = type(m).__module__.split(".")
        if (len(parts) >= 4 and parts[:2] == ["transformers", "models"] and parts[2] in SUPPORTED
                and type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")):
            layers.append(m)
    if not layers:
        raise ValueError(f"apply_sparse_decode supports {', '.join(SUPPORTED)} models; {type(model).__name__} "
                         f"({type(model).__module__}) has none of their attention layers")
    _register()
    original = model.config._attn_implementation
    handle = SparseDecodeHandle(model, policy, original, layers)
    policy.reset()
    for m in layers:
        m._posattn_sparse = _LayerState(handle, int(m.layer_idx))
    model.set_attn_implementation(_NAME)
    model._posattn_sparse_handle = handle
    return handle

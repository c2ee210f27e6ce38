"""Speculative greedy generation of a transformers Llama / Mistral / Qwen2 model through
posattn's decode engine over a paged KV cache.

    from posattn.integrations.transformers import speculative_generate
    from posattn.tree import TokenRecycling
    out = speculative_generate(model, input_ids, attention_mask, max_new_tokens=64,
                               drafter=TokenRecycling(model.config.vocab_size))

The model's own modules run (embeddings, layer norms, q/k/v/o projections, MLP, final
norm, lm_head); attention is posattn's: each layer's new tokens go through
``rope_and_cache`` (exact RoPE of q and k, k and v appended to the layer's paged cache) and
``decode_attention`` (cached prefix + the new tokens, under the draft tree's bit mask).
A step: the drafter proposes a tree per request rooted at its last token; one target
forward scores every node; ``verify_greedy`` accepts the longest path on which each token
is the target's argmax after its parent; ``kv_compact`` moves the accepted path's K/V to
the end of the cached prefix; the target's token after the last accepted node (the bonus)
is the next root. The tokens are those of greedy decoding, so the result is what
``model.generate(do_sample=False)`` returns (same stopping rule for ``max_new_tokens``
and ``eos_token_id``, left padding kept, finished rows padded with ``pad_token_id``),
up to ties in the argmax under fp32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import posattn
from posattn.decode.cache import rope_and_cache
from posattn.decode.compact import kv_compact
from posattn.tree import TokenRecycling, verify_greedy


@dataclass
class SpeculativeOutput:
    """``sequences``: [B, S + new] like generate's; ``target_forwards``: target-model forward
    passes (the prefill counts as one); ``new_tokens``: tokens generated per request (before padding);
    ``accepted``: per verification step, the tokens each request took from it (None once finished)."""

    sequences: torch.Tensor
    target_forwards: int
    new_tokens: list
    accepted: list = None

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per request per target forward (plain greedy decoding: 1.0)."""
        return sum(self.new_tokens) / max(1, len(self.new_tokens) * self.target_forwards)


class _Target:
    """The model's weights driven over a paged cache (one cache per layer)."""

    def __init__(self, model, num_pages: int, page_size: int, backend):
        cfg = model.config
        self.model, self.inner = model, model.model
        self.layers = list(self.inner.layers)
        self.HQ = cfg.num_attention_heads
        self.HK = getattr(cfg, "num_key_value_heads", None) or self.HQ
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.HQ
        self.spec = posattn.RopeSpec.from_hf_config(cfg)
        attn = self.layers[0].self_attn
        self.scale = float(getattr(attn, "scaling", self.D ** -0.5))
        # per-layer sliding windows: Qwen2 sets self_attn.sliding_window on its sliding layers only;
        # Mistral reads config.sliding_window in every layer
        def window(layer):
            a = layer.self_attn
            w = a.sliding_window if hasattr(a, "sliding_window") else getattr(cfg, "sliding_window", None)
            return int(w) if w else None

        self.windows = [window(layer) for layer in self.layers]
        p = next(model.parameters())
        # every layer's pages in one tensor: layer l owns pages [l * num_pages, (l + 1) * num_pages),
        # so one kv_compact launch moves the accepted tokens of every layer (block_table_all)
        L = len(self.layers)
        shape = (L * num_pages, page_size, self.HK, self.D)
        self.k_all = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v_all = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.k_cache = list(self.k_all.view(L, num_pages, page_size, self.HK, self.D).unbind(0))
        self.v_cache = list(self.v_all.view(L, num_pages, page_size, self.HK, self.D).unbind(0))
        self.num_pages, self.page_size, self.backend = num_pages, page_size, backend

    def compact(self, cache_seqlens, block_table, src, counts):
        """kv_compact of every layer in one launch: (layer, request) pairs are the requests of a
        paged cache made of all layers' pages; then cache_seqlens += counts."""
        L, B = len(self.layers), block_table.shape[0]
        offs = (torch.arange(L, device=block_table.device, dtype=torch.int32) * self.num_pages)[:, None, None]
        bt_all = (block_table[None] + offs).reshape(L * B, -1)
        lens_all = cache_seqlens.repeat(L)
        kv_compact(self.k_all, self.v_all, lens_all, src.repeat(L, 1), counts.repeat(L), block_table=bt_all,
                   backend=self.backend)
        cache_seqlens += counts.to(cache_seqlens.dtype)

    def forward(self, tokens, positions, slots, cache_seqlens, block_table, cu_seqlens_q, tree_mask, rows=None):
        """tokens int64 [N] (packed new tokens), positions [N], slots int64 [N] -> logits [N, V]
        (or of ``rows`` only: the prefill needs each prompt's last token's)."""
        N = tokens.shape[0]
        h = self.inner.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(N, self.HQ, self.D)
            k = a.k_proj(x).view(N, self.HK, self.D)
            v = a.v_proj(x).view(N, self.HK, self.D)
            q = rope_and_cache(q, k, v, positions, self.spec, self.k_cache[i], self.v_cache[i], slots,
                               backend=self.backend)
            o = posattn.decode_attention(q, self.k_cache[i], self.v_cache[i], cache_seqlens, block_table=block_table,
                                         cu_seqlens_q=cu_seqlens_q, tree_mask=tree_mask, causal=True,
                                         window=self.windows[i], softmax_scale=self.scale, backend=self.backend)
            h = h + a.o_proj(o.reshape(N, self.HQ * self.D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if rows is not None:
            h = h[rows]
        return self.model.lm_head(self.inner.norm(h))

    def slots(self, block_table, req, logical):
        """Physical slots (int64) of logical slots ``logical`` of requests ``req``."""
        ps = self.page_size
        return block_table[req, logical // ps].long() * ps + logical % ps


_FROM_MODEL = object()   # eos_token_id / pad_token_id not given: the model's generation_config (as generate)


def _from_config(model, name):
    gc = getattr(model, "generation_config", None)
    return getattr(gc, name, None) if gc is not None else None


def _eos_list(eos_token_id, model):
    if eos_token_id is _FROM_MODEL:
        eos_token_id = _from_config(model, "eos_token_id")
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def _check_windows(tgt, tb, cap: int) -> None:
    """Sliding windows are exact here only for chain drafts, or when no sequence outgrows them.

    decode_attention measures a window in logical cache slots; a tree node's slot (cached
    length + node index) is its position (cached length + depth) only when every tree is a
    chain. Windows no sequence can reach are dropped; others with branching trees are refused."""
    reach = [w for w in tgt.windows if w is not None and w < cap]
    tgt.windows = [w if (w is not None and w < cap) else None for w in tgt.windows]
    if not reach:
        return
    local = torch.arange(tb.total_nodes, device=tb.depth.device) - tb.cu_seqlens_q[:-1].long()[tb.batch_index]
    if not bool((tb.depth.long() == local).all()):
        raise ValueError(f"this model attends within a sliding window of {min(reach)} tokens, which these sequences "
                         f"(up to {cap} tokens) outgrow: decode_attention's window counts cache slots, which equal "
                         f"positions only for chain drafts; use a chain template (each node the child of the "
                         f"previous one) or a shorter max_new_tokens")


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         max_new_tokens: int = 20, drafter=None, page_size: int = 16, eos_token_id=_FROM_MODEL,
                         pad_token_id=_FROM_MODEL, return_dict_in_generate: bool = False,
                         backend: str | None = None):
    """Greedy generation with tree speculation over posattn's paged decode engine.

    Args:
        model: a transformers LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM (any dtype;
            exact equality with ``generate`` is claimed for fp32).
        input_ids: int64 [B, S], left-padded as transformers expects; attention_mask [B, S] (1 =
            token, 0 = padding), default all ones.
        max_new_tokens: at most this many new tokens per request.
        drafter: an object with ``draft(last_tokens [B]) -> (draft_tokens [ΣT], TreeBatch)`` and
            ``update(draft_tokens, target_logits, batch)``, whose trees never exceed its first
            draft's size; default TokenRecycling(vocab_size).
        page_size: tokens per cache page.
        eos_token_id, pad_token_id: as generate: not given, the model's generation_config; None,
            no end-of-sequence token (pad_token_id None: eos_token_id's first, else 0).
        return_dict_in_generate: return a :class:`SpeculativeOutput` instead of the tensor.
        backend: force the posattn backend of rope_and_cache and decode_attention.

    Returns:
        sequences int64 [B, S + n]: the prompt followed by the new tokens (n the longest
        request's), rows that stopped early padded with pad_token_id; or a SpeculativeOutput.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor; got {getattr(input_ids, 'shape', type(input_ids))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    dev = input_ids.device
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    eos = _eos_list(eos_token_id, model)
    if pad_token_id is _FROM_MODEL:
        pad_token_id = _from_config(model, "pad_token_id")
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if drafter is None:
        drafter = TokenRecycling(model.config.vocab_size, device=dev)
    if max_new_tokens == 0:
        seq = input_ids.clone()
        return SpeculativeOutput(seq, 0, [0] * B, []) if return_dict_in_generate else seq

    mask = attention_mask.bool()
    lens = mask.sum(1).tolist()
    if min(lens) < 1:
        raise ValueError("every request needs at least one prompt token (a row of attention_mask is all 0)")
    _, tb0 = drafter.draft(input_ids[:, -1])            # drafting reads the drafter only: learn the tree size
    max_nodes = max(tb0.num_nodes)
    cap = max(lens) + max_new_tokens + max_nodes + 1
    pages_per = -(-cap // page_size)
    # pages in reverse order: the engine follows the block table, it never assumes identity
    block_table = torch.arange(B * pages_per, device=dev, dtype=torch.int32).flip(0).view(B, pages_per).contiguous()
    tgt = _Target(model, B * pages_per, page_size, backend)
    _check_windows(tgt, tb0, cap)

    # prefill: each request's real prompt tokens (left padding dropped) at positions 0..len-1, causal
    tokens = input_ids[mask]
    lens_t = torch.tensor(lens, device=dev)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(lens_t, 0)
    req = torch.repeat_interleave(torch.arange(B, device=dev), lens_t)
    pos = torch.arange(tokens.shape[0], device=dev) - cu[:-1].long()[req]
    cache_seqlens = torch.zeros(B, dtype=torch.int32, device=dev)
    logits = tgt.forward(tokens, pos, tgt.slots(block_table, req, pos), cache_seqlens, block_table, cu, None,
                         rows=cu[1:].long() - 1)
    forwards = 1
    cache_seqlens += lens_t.to(torch.int32)
    # invariant of every step: the cache holds all tokens before the root; the root (the last
    # generated token) is node 0 of the request's tree, written with the drafts
    root = logits.argmax(-1)
    out = [[int(t)] for t in root.tolist()]
    done = [(bool(eos) and o[-1] in eos) or len(o) >= max_new_tokens for o in out]
    accepted = []
    while not all(done):
        draft, tb = drafter.draft(root)
        if max(tb.num_nodes) > max_nodes:
            raise ValueError(f"the drafter's trees grew from {max_nodes} to {max(tb.num_nodes)} nodes; the cache "
                             f"was sized for the first draft's (a drafter must keep its tree size bound)")
        local = torch.arange(tb.total_nodes, device=dev) - tb.cu_seqlens_q[:-1].long()[tb.batch_index]
        slots = tgt.slots(block_table, tb.batch_index, cache_seqlens.long()[tb.batch_index] + local)
        logits = tgt.forward(draft, tb.positions(cache_seqlens), slots, cache_seqlens, block_table,
                             tb.cu_seqlens_q, tb.tree_mask)
        forwards += 1
        idx, n, bonus = verify_greedy(draft, logits.argmax(-1), tb)
        drafter.update(draft, logits, tb)
        # the accepted path (root first) moves to the end of the cached prefix; finished requests stay
        counts = torch.where(torch.tensor(done, device=dev), 0, n)
        src = cache_seqlens.long()[:, None] + idx.long().clamp(min=0)
        tgt.compact(cache_seqlens, block_table, src, counts)
        # new tokens: the accepted drafts after the root, then the bonus (one host sync a step)
        idx_h, n_h, bonus_h, draft_h = idx.tolist(), n.tolist(), bonus.tolist(), draft.tolist()
        starts = tb.cu_seqlens_q.tolist()
        accepted.append([None if done[b] else n_h[b] for b in range(B)])
        for b in range(B):
            if done[b]:
                continue
            for t in [draft_h[starts[b] + j] for j in idx_h[b][1:n_h[b]]] + [bonus_h[b]]:
                out[b].append(t)
                if (eos and t in eos) or len(out[b]) >= max_new_tokens:
                    done[b] = True
                    break
        root = bonus
    n_new = max(len(o) for o in out)
    seq = torch.full((B, S + n_new), pad_token_id, dtype=input_ids.dtype, device=dev)
    seq[:, :S] = input_ids
    for b, o in enumerate(out):
        seq[b, S:S + len(o)] = torch.tensor(o, dtype=input_ids.dtype, device=dev)
    if return_dict_in_generate:
        return SpeculativeOutput(seq, forwards, [len(o) for o in out], accepted)
    return seq

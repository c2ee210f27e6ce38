"""posattn.vq's ops: assign (codes of keys), code_scores (far tokens by centroid lookup) and scores
(A2ATS's windowed scores: far tokens from codes, the last ``window`` tokens exactly).

Lowering: a contiguous codes cache [B, S_cap, Hk] is the paged one with one page of S_cap slots per
request (block_table = arange(B)), as for the keys (posattn/select/scores.py). The far query is q
rotated at ReRoPE(window)'s far position (q at ``window``, keys unrotated: posattn/position_maps.py),
built here (tiny); the kernels get fp32 rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn import dispatch
from posattn.lowered import token_bucket
from posattn.vq.codebook import Codebook, check_codebook


@dataclass(frozen=True)
class VqAssignKey:
    """What vq_assign's kernel choice depends on (shapes only)."""

    device_type: str
    dtype: str
    head_dim: int
    heads_k: int
    codes_bucket: int
    tokens_bucket: int


@dataclass(frozen=True)
class VqScoresKey:
    """What vq_code_scores' kernel choice and launch config depend on (shapes only)."""

    device_type: str
    dtype: str          # the queries' dtype (float64 runs on the reference; the others in fp32)
    head_dim: int
    heads_q: int
    heads_k: int
    codes_bucket: int
    page_size: int
    kv_bucket: int
    batch_bucket: int


def _dname(dt) -> str:
    return str(dt).removeprefix("torch.")


def assign(keys: torch.Tensor, codebook: Codebook, *, backend: str | None = None) -> torch.Tensor:
    """Codes of ``keys``: each key's nearest centroid under the codebook's metric.

    Args:
        keys: [T, Hk, D] pre-RoPE keys (fp32/fp16/bf16; fp64 on the reference), last dim contiguous
            after any view (other strides free).
        codebook: from :func:`posattn.vq.fit`, on the keys' device, for Hk heads of head_dim D.
    Returns:
        codes [T, Hk], int16 when the codebook has <= 32768 codes, else int32.
    """
    V.float_tensor(keys, "keys")
    if keys.dim() != 3:
        raise ValueError(f"keys must be [T, Hk, D] (pre-RoPE keys); got shape {tuple(keys.shape)}")
    T, HK, D = keys.shape
    check_codebook(codebook, HK, D, keys.device, "keys")
    key = VqAssignKey(keys.device.type, _dname(keys.dtype), D, HK, token_bucket(codebook.n_codes), token_bucket(T))
    kernel, config = dispatch.select("vq_assign", key, backend=backend, device_index=keys.device.index)
    return kernel.fn(keys, codebook.metric_centroids, codebook.centroid_norms, codebook.code_dtype, config)


def _check_codes(codes, codebook, B, block_table, device, HK):
    V.tensor(codes, "codes")
    if codes.dtype != codebook.code_dtype:
        raise TypeError(f"codes must be {codebook.code_dtype} (the codebook's code dtype for {codebook.n_codes} "
                        f"codes, as assign writes them); got {codes.dtype}")
    if codes.dim() != 3 or codes.shape[2] != HK:
        raise ValueError(f"codes must be [B, S_cap, Hk={HK}] (or [num_blocks, page_size, Hk] with block_table); "
                         f"got shape {tuple(codes.shape)}")
    if codes.device != device:
        raise ValueError(f"codes is on {codes.device} but q is on {device}; all tensors must be on one device")
    if codes.stride(-1) != 1:
        raise ValueError("codes must be contiguous in its last (head) dimension")
    if block_table is None:
        if codes.shape[0] != B:
            raise ValueError(f"a contiguous codes cache must be [B={B}, S_cap, Hk]; got {tuple(codes.shape)}")
        return codes.shape[1]
    from posattn.decode.checks import _int32

    _int32(block_table, "block_table", device, 2, "[B, max_blocks] of page indices")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be [{B}, max_blocks]; got {list(block_table.shape)}")
    return block_table.shape[1] * codes.shape[1]


def _check_q(q, codebook, name="q"):
    V.float_tensor(q, name)
    if q.dim() != 3:
        raise ValueError(f"{name} must be [B, Hq, D] (one query per request); got shape {tuple(q.shape)}")
    B, HQ, D = q.shape
    check_codebook(codebook, codebook.heads_k, D, q.device, name)
    if HQ % codebook.heads_k:
        raise ValueError(f"{name} has {HQ} heads, not a multiple of the codebook's {codebook.heads_k} KV heads")
    return B, HQ, D


def _scale(softmax_scale, D):
    if softmax_scale is None:
        return D ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
    return float(softmax_scale)


def _bt(block_table, B, device):
    return torch.arange(B, dtype=torch.int32, device=device)[:, None] if block_table is None else block_table


def _code_scores(qf, codebook, codes, far_len, bt, scale, out, backend, dtype=None):
    B, HQ, D = qf.shape
    key = VqScoresKey(qf.device.type, _dname(dtype or qf.dtype), D, HQ, codebook.heads_k,
                      token_bucket(codebook.n_codes), codes.shape[1], token_bucket(out.shape[2]), token_bucket(B))
    kernel, config = dispatch.select("vq_code_scores", key, backend=backend, device_index=qf.device.index)
    wide = torch.float64 if kernel.backend == "reference" else torch.float32
    return kernel.fn(qf.to(wide), codebook.centroids, codes, bt, far_len, scale, out, config)


def code_scores(qf: torch.Tensor, codebook: Codebook, codes: torch.Tensor, far_len: torch.Tensor, *,
                block_table: torch.Tensor | None = None, softmax_scale: float | None = None,
                backend: str | None = None) -> torch.Tensor:
    """Scores of cached tokens from their codes alone: ``scale * qf . centroid[code]``.

    Args:
        qf: [B, Hq, D] the queries as they meet the (unrotated) centroids, e.g. rotated at the
            window distance (``scores`` builds them).
        codes: [B, S_cap, Hk] (contiguous cache) or [num_blocks, page_size, Hk] with
            ``block_table`` int32 [B, max_blocks]; the codebook's code dtype.
        far_len: int32 [B], slots scored per request (those at or after it are -inf).
    Returns:
        fp32 [B, Hq, S_max], -inf from ``far_len[b]`` on.
    """
    B, HQ, D = _check_q(qf, codebook, "qf")
    S = _check_codes(codes, codebook, B, block_table, qf.device, codebook.heads_k)
    from posattn.decode.checks import _int32

    _int32(far_len, "far_len", qf.device, 1, "[B] (slots scored per request)")
    if far_len.shape[0] != B:
        raise ValueError(f"far_len must be [{B}]; got {list(far_len.shape)}")
    out = torch.empty(B, HQ, S, dtype=torch.float32, device=qf.device)
    return _code_scores(qf, codebook, codes, far_len, _bt(block_table, B, qf.device), _scale(softmax_scale, D),
                        out, backend)


def _check_window(window):
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int (tokens scored exactly), got {type(window).__name__}")
    if window <= 0:
        raise ValueError(f"window must be >= 1 (the last `window` tokens are scored exactly); got {window}")


def _check_rope(rope, q):
    from posattn.rope.spec import RopeSpec
    from posattn.rope.table import is_plain

    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a posattn.RopeSpec (the keys are cached before RoPE); got "
                        f"{type(rope).__name__}")
    if rope.head_dim != q.shape[2]:
        raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal q's head_dim ({q.shape[2]})")
    if getattr(rope, "depends_on_seq_len", False) or not is_plain(rope.tables(q.device)):
        raise ValueError("rope: vq.scores supports specs with one inv_freq row and tables that do not depend on "
                         "the sequence length (as select.scores)")


def far_queries(q: torch.Tensor, rope, window: int, *, inverse_positions: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """fp32 (fp64 for the reference or fp64 q) [B, Hq, D]: q rotated at ReRoPE(window)'s far query
    position (``window``), its rotary dims times attention_scaling once more, so that ``far . k``
    carries the a^2 of a rotated pair.

    ``inverse_positions`` int [B]: q is *post*-RoPE at these positions (rotated and scaled); it is
    rotated back first, so the result is what the pre-RoPE q would give.
    """
    from posattn.kernels.reference.select_scores import rotate_table
    from posattn.position_maps import ReRoPE
    from posattn.rope.table import cos_sin_table, default_backend

    B = q.shape[0]
    t = rope.tables(q.device)
    inv = t.inv_freq.to(torch.float32).contiguous()
    a = float(t.attention_scaling)
    R = rope.rotary_dim if rope.rotary_dim is not None else q.shape[2]
    inter = bool(rope.interleaved)
    be = backend if backend in ("triton", "cpu", "reference") else default_backend(q.device)
    x = q.to(torch.float64 if be == "reference" or q.dtype == torch.float64 else torch.float32)
    if inverse_positions is not None:
        # post-RoPE q = a R(p) q_pre on the rotary dims (the table carries a; pass-through dims
        # are neither rotated nor scaled): rotating by -p with the unscaled table, then / a, gives q_pre
        tab = cos_sin_table(inverse_positions.to(torch.int64), inv, 1.0, backend=be).to(x.dtype)
        x = rotate_table(x, tab[0][:, None, :], -tab[1][:, None, :], R, inter)
        if a != 1.0:
            x = torch.cat((x[..., :R] / a, x[..., R:]), dim=-1)
    fpos = ReRoPE(window).far_q(torch.zeros(B, dtype=torch.int64, device=q.device))
    tab = cos_sin_table(fpos, inv, a, backend=be).to(x.dtype)
    x = rotate_table(x, tab[0][:, None, :], tab[1][:, None, :], R, inter)
    # the keys meet the centroids unrotated: the a that their table would carry goes on q's rotary dims
    return torch.cat((x[..., :R] * a, x[..., R:]), dim=-1) if a != 1.0 else x


def scores(q: torch.Tensor, codebook: Codebook, codes: torch.Tensor, cache_seqlens: torch.Tensor, *,
           k_cache: torch.Tensor, window: int, rope, block_table: torch.Tensor | None = None,
           reduce: str = "none", softmax_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """A2ATS's windowed scores over a cache of pre-RoPE keys and their codes.

    The query (at position ``cache_seqlens[b]``; key at slot s has position s) scores slot s
    - exactly, ``scale * R(L) q . R(s) k_s`` (select.scores with key_positions), for the last
      ``window`` slots ``L - window <= s < L``;
    - approximately, ``scale * R(window) q . centroid[code_s]`` (ReRoPE(window)'s far rotation with
      k replaced by its centroid), for ``s < L - window``.
    At distance exactly ``window`` both rotations agree, so this is ReRoPE(window) with far keys
    quantized.

    Args:
        q: [B, Hq, D] pre-RoPE queries, one per request.
        codebook: posattn.vq.fit's, for the cache's Hk and D.
        codes: [B, S_cap, Hk] or [num_blocks, page_size, Hk] (with block_table), the keys' codes at
            the keys' slots (codebook.code_dtype).
        cache_seqlens: int32 [B], tokens cached per request (clamped to S_max).
        k_cache: the pre-RoPE key cache, laid out as codes with a trailing D (q's dtype).
        window: >= 1; rope: the model's RopeSpec (one inv_freq row).
        reduce: "none" -> per query head; "kv_group" -> each GQA group's scores summed (the far
            part sums the group's far queries first: one table and one gather per KV head).
    Returns:
        fp32 [B, Hq | Hk, S_max] (a view with row stride S_max + 1), -inf past each request's
        length: what select.topk takes.
    """
    from posattn.decode.checks import _int32

    _check_window(window)
    B, HQ, D = _check_q(q, codebook)
    _check_rope(rope, q)
    HK = codebook.heads_k
    S = _check_codes(codes, codebook, B, block_table, q.device, HK)
    V.float_tensor(k_cache, "k_cache")
    if k_cache.dim() != 4 or tuple(k_cache.shape[:3]) != tuple(codes.shape) or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be laid out as codes with a trailing head_dim: "
                         f"{tuple(codes.shape) + (D,)}; got {tuple(k_cache.shape)}")
    if k_cache.dtype != q.dtype or k_cache.device != q.device:
        raise TypeError(f"k_cache must have q's dtype {q.dtype} and device {q.device}; got {k_cache.dtype} on "
                        f"{k_cache.device}")
    _int32(cache_seqlens, "cache_seqlens", q.device, 1, "[B] (tokens cached per request)")
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [{B}] (q's batch); got {list(cache_seqlens.shape)}")
    V.choice(reduce, "reduce", ("none", "kv_group"))
    scale = _scale(softmax_scale, D)
    qf = far_queries(q, rope, window, backend=backend)
    return windowed(q, qf, codebook, codes, k_cache, _bt(block_table, B, q.device), cache_seqlens, window, scale,
                    rope, backend, reduce)


def windowed(q, qf, codebook, codes, k_cache, bt, cache_seqlens, window, scale, rope, backend, reduce="none"):
    """The checked pipeline (also the A2ATS policy's): far slots ``s < L - window`` by code with the far
    queries ``qf``, the window exactly by select.scores over a gathered copy of the window's keys
    ([B, window, Hk, D]: no copy of the cache). ``rope=None``: q and k_cache are already rotated at
    their positions (a post-RoPE cache), so the window is scored as stored."""
    from posattn.select.scores import scores as select_scores

    B, HQ, D = q.shape
    if reduce == "kv_group":      # q . k summed over the group = (sum of the group's q) . k
        HQ = codebook.heads_k
        qf = qf.view(B, HQ, -1, D).sum(2)
    PS = k_cache.shape[1]
    S = bt.shape[1] * PS
    if S == 0:
        return torch.empty(B, HQ, 0, dtype=torch.float32, device=q.device)
    L = cache_seqlens.to(torch.int64).clamp(0, S)
    lo = (L - window).clamp_min(0)                                             # far slots: s < lo
    j = torch.arange(window, device=q.device)
    slot = (lo[:, None] + j).clamp(0, max(S - 1, 0))                           # [B, W]
    page = torch.gather(bt.to(torch.int64), 1, slot // PS).clamp(0, k_cache.shape[0] - 1)
    kw = k_cache[page, slot % PS]                                              # [B, W, Hk, D]: the window only
    n = (L - lo).to(torch.int32)
    if rope is None:
        near = select_scores(q, kw, n, reduce=reduce, softmax_scale=scale, backend=backend)
    else:
        near = select_scores(q, kw, n, reduce=reduce, rope=rope, positions=L, key_positions=slot,
                             softmax_scale=scale, backend=backend)            # [B, Hq | Hk, W]
    full = torch.empty(B, HQ, S + 1, dtype=torch.float32, device=q.device)
    out = full[..., :S]
    _code_scores(qf, codebook, codes, lo.to(torch.int32), bt, scale, out, backend, q.dtype)
    # the window's exact scores go to their slots; the window's unused tail to the spare column S
    dst = torch.where(j[None, :] < (L - lo)[:, None], lo[:, None] + j, torch.full_like(slot, S))
    full.scatter_(2, dst[:, None, :].expand(B, HQ, window), near)
    return out


def check_cache_codes(k, k_cache, kv_layout, codebook, codes) -> None:
    """rope_and_cache(codebook=, codes=)'s checks: both given, the codebook for k's heads and head_dim,
    codes an int16/int32 (the codebook's) [num_blocks, page_size, Hk] laid out as k_cache's slots."""
    if codebook is None or codes is None:
        raise ValueError("codebook and codes go together: pass both (codes are written with the keys) or neither")
    V.float_tensor(k, "k")
    if k.dim() != 3:
        raise ValueError(f"k must be [T, Hk, D]; got shape {tuple(k.shape)}")
    HK, D = k.shape[1], k.shape[2]
    check_codebook(codebook, HK, D, k.device, "k")
    V.tensor(codes, "codes")
    if codes.dtype != codebook.code_dtype:
        raise TypeError(f"codes must be {codebook.code_dtype} (the codebook's code dtype); got {codes.dtype}")
    nb, ps = (k_cache.shape[0], k_cache.shape[2]) if kv_layout == "HND" else (k_cache.shape[0], k_cache.shape[1])
    if tuple(codes.shape) != (nb, ps, HK):
        raise ValueError(f"codes must be [num_blocks={nb}, page_size={ps}, Hk={HK}] (one code per cache slot and "
                         f"KV head); got {tuple(codes.shape)}")
    if codes.device != k.device:
        raise ValueError(f"codes is on {codes.device} but k is on {k.device}")
    if not codes.is_contiguous():
        raise ValueError("codes must be contiguous (written through slot_mapping)")


def write_cache_codes(k, codebook, codes, slot_mapping, backend=None) -> None:
    """codes[slot_mapping[t]] = assign(k)[t] for the tokens with a slot (-1: skipped), without a host
    sync: a skipped token adds 0 at slot 0, a written one adds (new - old), both modulo 2^bits (the
    accumulate of index_put_ wraps like the int dtype), so every slot ends with its new code."""
    if k.shape[0] == 0:
        return
    be = backend if backend in ("triton", "cpu", "reference") else None        # (no cuda assign kernel)
    new = assign(k, codebook, backend=be).to(codes.device)                      # [T, Hk]
    flat = codes.view(-1, codes.shape[-1])
    keep = slot_mapping >= 0
    idx = slot_mapping.clamp_min(0)
    delta = torch.where(keep[:, None], new - flat[idx], torch.zeros_like(new))
    flat.index_put_((idx,), delta, accumulate=True)

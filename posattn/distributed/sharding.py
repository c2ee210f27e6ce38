"""Sequence sharding for context parallelism: which global tokens each rank holds.

The packed token axis of one step (T tokens, every document and row of it) is cut into
chunks whose boundaries are ``(i * T) // n`` (chunk sizes differ by at most one token):

    "contiguous": n = world_size chunks; rank r holds chunk r.
    "zigzag":     n = 2 * world_size chunks; rank r holds chunk r and chunk 2 * world_size - 1 - r
                  (in that order), so every rank holds as much causal work as any other
                  when the step is one causal sequence.
    "zigzag_doc": every document [s, e) of ``cu_seqlens`` is cut into 2 * world_size chunks
                  (boundaries s + (i * L) // n, L = e - s); rank r holds chunks r and n - 1 - r
                  of every document, document after document (Megatron-LM / TransformerEngine's
                  THD context parallelism), which balances causal work however many documents
                  the step packs. Documents shorter than n tokens leave some chunks empty.
                  Needs ``cu_seqlens`` (the layout depends on the documents, not on T alone).

With "zigzag" and "contiguous" documents are not aligned to chunks: a document may cross
shard boundaries, and its
tokens then keep their *global* positions (``shard_positions``), so that RoPE on a shard
equals RoPE on the whole step (the packed-sequence-under-CP position bug is the case where
a shard restarts positions at 0).

Every function here is a pure function of (T, world_size, rank, shard[, cu_seqlens]): all
ranks compute every other rank's layout without communicating. A rank's ranges are ascending
and disjoint in every scheme.
"""
from __future__ import annotations

import torch

SHARDS = ("zigzag", "contiguous", "zigzag_doc")


def _check_world(world_size, rank) -> None:
    for name, x in (("world_size", world_size), ("rank", rank)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")


def _check_shard(shard) -> None:
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")


def _doc_bounds(cu_seqlens, T: int | None) -> list[int]:
    """cu_seqlens (int tensor or list [N+1], 0..T) as a checked list."""
    if cu_seqlens is None:
        raise ValueError('shard="zigzag_doc" needs cu_seqlens= (the step\'s document boundaries [N+1])')
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be an int32/int64 1-D tensor of boundaries [N+1]; got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        cs = cu_seqlens.tolist()
    else:
        cs = list(cu_seqlens)
    if len(cs) < 2 or cs[0] != 0 or any(b < a for a, b in zip(cs, cs[1:])) or (T is not None and cs[-1] != T):
        raise ValueError(f"cu_seqlens must be non-decreasing boundaries from 0 to T"
                         f"{'' if T is None else f' = {T}'}; got {cs[:8]}{'...' if len(cs) > 8 else ''}")
    return cs


def shard_ranges(T: int, world_size: int, rank: int, shard: str = "zigzag", *,
                 cu_seqlens=None) -> list[tuple[int, int]]:
    """The global token ranges [start, end) rank ``rank`` holds, ascending, in the order its local
    tokens follow (adjacent pieces merged; a rank without tokens gets [(0, 0)]).
    ``cu_seqlens`` (int [N+1] tensor or list): the document boundaries, for "zigzag_doc"."""
    _check_world(world_size, rank)
    _check_shard(shard)
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T (the step's token count) must be an int >= 0, got {T!r}")
    if shard == "zigzag_doc":
        return _doc_ranges(_doc_bounds(cu_seqlens, T), world_size, rank)
    n = 2 * world_size if shard == "zigzag" else world_size
    b = [(i * T) // n for i in range(n + 1)]
    if shard == "contiguous":
        return [(b[rank], b[rank + 1])]
    c = 2 * world_size - 1 - rank
    return [(b[rank], b[rank + 1]), (b[c], b[c + 1])]


def _doc_ranges(cs: list[int], world_size: int, rank: int) -> list[tuple[int, int]]:
    n = 2 * world_size
    out: list[tuple[int, int]] = []
    for s, e in zip(cs[:-1], cs[1:]):
        L = e - s
        for i in (rank, n - 1 - rank):
            a, b = s + (i * L) // n, s + ((i + 1) * L) // n
            if a == b:
                continue
            if out and out[-1][1] == a:             # e.g. rank 0: a document's last chunk, the next one's first
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    return out or [(0, 0)]


def shard_sizes(T: int, world_size: int, shard: str = "zigzag", *, cu_seqlens=None) -> list[int]:
    """Local token count of every rank."""
    if shard == "zigzag_doc":
        cu_seqlens = _doc_bounds(cu_seqlens, T)          # one host read for all ranks
    return [sum(e - s for s, e in shard_ranges(T, world_size, r, shard, cu_seqlens=cu_seqlens))
            for r in range(world_size)]


def shard_indices(T: int, world_size: int, rank: int, shard: str = "zigzag",
                  device: torch.device | str | None = None, *, cu_seqlens=None) -> torch.Tensor:
    """int64 [T_local]: the global token index of each of the rank's local tokens."""
    parts = [torch.arange(s, e, dtype=torch.int64, device=device)
             for s, e in shard_ranges(T, world_size, rank, shard, cu_seqlens=cu_seqlens)]
    return torch.cat(parts)


def _dim(x: torch.Tensor, dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_tensor(x: torch.Tensor, world_size: int, rank: int, *, shard: str = "zigzag",
                 dim: int = 0, cu_seqlens=None) -> torch.Tensor:
    """The rank's part of ``x`` along its sequence dimension ``dim`` (0 for packed [T, H, D],
    1 for [B, S, H, D]). A view for "contiguous", a copy for "zigzag" (two pieces) and
    "zigzag_doc" (two per document; ``cu_seqlens`` [N+1] required)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    d = _dim(x, dim, "x")
    pieces = [x.narrow(d, s, e - s) for s, e in shard_ranges(x.shape[d], world_size, rank, shard,
                                                              cu_seqlens=cu_seqlens)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, d)


def shard_positions(positions: torch.Tensor | None, world_size: int, rank: int, *, shard: str = "zigzag",
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Global positions of the rank's tokens.

    Args:
        positions: the step's positions with the sequence on the last dimension: [T] (packed),
            [S], [B, S], or [n_axes, ...] for multi-axis (mrope) positions; or None with
            ``cu_seqlens``.
        cu_seqlens: int [N+1] document boundaries of a packed step. Without ``positions`` the
            positions restart at 0 at every document (``t - cu_seqlens[doc(t)]``), as packed
            training feeds them; with ``positions`` (and "zigzag_doc", which requires it) it
            only describes the documents the shard follows.
    Returns:
        positions[..., shard_indices(...)]: [T_local] (or [..., S_local]) with global values, for
        ``apply_rope(q_local, k_local, positions=..., layout="thd")`` on the shard.
    """
    if positions is None and cu_seqlens is None:
        raise ValueError("pass positions, or cu_seqlens= (packed positions restart at every document), "
                         "to shard_positions")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (
            torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2):
        raise ValueError("cu_seqlens must be an int32/int64 1-D tensor of boundaries [N+1] (0, ..., T)")
    if positions is None:
        cs = cu_seqlens.to(torch.int64)
        T = int(cs[-1].item())
        from posattn.attention.masks import token_starts

        tok = torch.arange(T, dtype=torch.int64, device=cs.device)
        positions = (tok - token_starts(cs, T).to(torch.int64)).to(cu_seqlens.dtype)
    elif not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    elif positions.dim() == 0:
        raise ValueError("positions must have a sequence dimension (its last); got a 0-D tensor")
    idx = shard_indices(positions.shape[-1], world_size, rank, shard, device=positions.device, cu_seqlens=cu_seqlens)
    return positions.index_select(positions.dim() - 1, idx)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, total, dim, shard, group, cs):
        import torch.distributed as dist

        W, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.args = (W, rank, shard, dim, cs)
        sizes = shard_sizes(total, W, shard, cu_seqlens=cs)
        if x.shape[dim] != sizes[rank]:
            raise ValueError(f"x has {x.shape[dim]} tokens on dimension {dim} but rank {rank}'s shard of "
                             f"{total} tokens ({shard}, world {W}) has {sizes[rank]}")
        pad = max(sizes)
        shape = list(x.shape)
        shape[dim] = pad
        buf = x.new_zeros(shape)
        buf.narrow(dim, 0, x.shape[dim]).copy_(x)
        bufs = [torch.empty_like(buf) for _ in range(W)]
        dist.all_gather(bufs, buf.contiguous(), group=group)
        shape[dim] = total
        out = x.new_empty(shape)
        for r in range(W):
            off = 0
            for s, e in shard_ranges(total, W, r, shard, cu_seqlens=cs):
                out.narrow(dim, s, e - s).copy_(bufs[r].narrow(dim, off, e - s))
                off += e - s
        return out

    @staticmethod
    def backward(ctx, g):
        W, rank, shard, dim, cs = ctx.args
        return shard_tensor(g, W, rank, shard=shard, dim=dim, cu_seqlens=cs), None, None, None, None, None


def gather_tensor(x: torch.Tensor, total: int, *, group=None, shard: str = "zigzag", dim: int = 0,
                  cu_seqlens=None) -> torch.Tensor:
    """Reassemble the step from every rank's shard (``shard_tensor``'s inverse), on every rank.

    Args:
        x: this rank's part, ``total`` tokens' shard on dimension ``dim``.
        total: the step's token count T.
        cu_seqlens: the step's document boundaries [N+1], for shard="zigzag_doc".
    Returns:
        [..., T, ...] in global token order (one all_gather; differentiable: the gradient of
        the rank's shard is its part of the incoming gradient).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_shard(shard)
    d = _dim(x, dim, "x")
    cs = _doc_bounds(cu_seqlens, int(total)) if shard == "zigzag_doc" else None
    return _Gather.apply(x, int(total), d, shard, group, cs)

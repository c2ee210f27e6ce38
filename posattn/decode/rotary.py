"""decode_attention's in-kernel rotation: pre-RoPE caches (``key_positions``), ``qk_precision``
and relative-position maps (``position_map``), checked and lowered to :class:`DecodeRotary`,
the data every backend reads.

Lowering (per call, no host synchronisation):

    qpos [T]         each new token's query position: ``positions``, else the key position of its
                     own slot (``"slots"``: cache_seqlens[b] + i; a tensor: key_positions[b, slot])
    qn   [T, Hq, D]  q rotated at qpos in fp32 (fp64 for the reference backend) by the per-call
                     cos/sin table of posattn/rope/table.py, built by the kernel's own backend
    ktab [2, rows, S, R/2]  fp32 cos/sin at each logical slot's key position (rows 1 for "slots"
                     or [S] positions, B for [B, S]); None when the cache holds rotated keys
    ktab_far         the same at far_k(key position); [2, 1, 1, R/2] when far_k is 0 for every key
                     (ReRoPE, VistaRoPE): kernels read that one row for every far key
    with a map: qf (q rotated at far_q(qpos)), ktab_far (at far_k(key position)), qpos/kpos as
                     fp64 (exact, as the spec compares) for the near/far decision, VistaRoPE's flags

With ``"slots"`` the key tables depend on the signature only and are kept in the plan. The
kernel rotates each cached key tile with ktab (and ktab_far on tiles that need the far product),
so the cache keeps keys before RoPE and the new k is written unrotated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posattn import _validate as V
from posattn.position_maps import VISTA, ReRoPE, VistaRoPE, check_position_map

QK_PRECISIONS = ("bf16", "bf16x3", "fp32")
POS_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
_TABLE_BACKEND = {"triton": "triton", "cpu": "cpu", "reference": "reference"}


@dataclass
class DecodeRotary:
    """What a backend reads to rotate inside the kernel; see the module docstring for shapes.

    qkp: 0 "bf16" (rotated q/k rounded to the input dtype), 1 "bf16x3" (hi.hi + hi.lo + lo.hi),
    2 "fp32"; map_code/window: posattn.position_maps' kernel codes (0 = no map)."""

    qn: torch.Tensor
    ktab: torch.Tensor | None
    rotary_dim: int
    interleaved: bool
    qkp: int
    map_code: int = 0
    window: int = 0
    qf: torch.Tensor | None = None
    ktab_far: torch.Tensor | None = None
    qpos: torch.Tensor | None = None
    kpos: torch.Tensor | None = None
    visual: torch.Tensor | None = None       # uint8 [B, S]

    @staticmethod
    def strides(tab) -> tuple[int, int, int]:
        """(cos->sin, row, slot) strides of a key table [2, rows, S, R/2] as kernels read it: 0 for a
        single row (shared by the batch) or a single slot (one position for every key); 0s for None."""
        if tab is None:
            return 0, 0, 0
        return tab.stride(0), (tab.stride(1) if tab.shape[1] > 1 else 0), (tab.stride(2) if tab.shape[2] > 1 else 0)


def wants_rotary(rope, key_positions, qk_precision, position_map) -> bool:
    """Whether the call needs the in-kernel rotation (else the old path: apply_rope, rotated cache)."""
    return rope is not None and (key_positions is not None or qk_precision != "bf16" or position_map is not None)


def check_plain_rope(rope, device, user: str, users: str) -> None:
    """Named ValueError unless ``rope`` can be rotated by a per-call table of one inv_freq row
    (the in-kernel rotation of decode_attention and select.scores). ``user``: who refuses a
    sequence-length-dependent spec ("scores"); ``users``: who needs one row ("scores supports")."""
    from posattn.rope.table import is_plain

    if getattr(rope, "depends_on_seq_len", False):
        raise ValueError("rope: specs whose tables depend on the sequence length (DynamicNTK, LongRoPE) are not "
                         f"supported {user}")
    if not is_plain(rope.tables(device)):
        raise ValueError(f"rope: {users} specs with one inv_freq row (no per-head rows, mrope sections or DPE)")


def check(rope, key_positions, qk_precision, position_map, positions, q, B: int, S: int) -> None:
    """Named errors for the new arguments (no device work). S = the slots per request (capacity)."""
    if not isinstance(qk_precision, str) or qk_precision not in QK_PRECISIONS:
        raise ValueError(f"qk_precision must be one of {QK_PRECISIONS}; got {qk_precision!r}")
    check_position_map(position_map, rope)
    if rope is None:
        if qk_precision != "bf16":
            raise ValueError(f"qk_precision={qk_precision!r} needs rope=: it says how the kernel multiplies the "
                             "q/k it rotates (without rope= q and k arrive rotated: use the default 'bf16')")
        if key_positions is not None:
            raise ValueError("key_positions is read only with rope= (the cache holds keys before RoPE)")
    if position_map is not None and key_positions is None:
        raise ValueError('position_map needs key_positions ("slots" or a tensor): the map rotates each pair '
                         "inside the kernel, so the cache must hold keys before RoPE")
    if not wants_rotary(rope, key_positions, qk_precision, position_map):
        return
    check_plain_rope(rope, q.device, "with key_positions, qk_precision or position_map",
                     "key_positions, qk_precision and position_map support")
    if isinstance(key_positions, str):
        if key_positions != "slots":
            raise ValueError(f'key_positions must be "slots" or a tensor; got {key_positions!r}')
    elif key_positions is not None:
        V.tensor(key_positions, "key_positions")
        if key_positions.dtype not in POS_DTYPES:
            raise TypeError(f"key_positions must be int32, int64, float32 or float64; got {key_positions.dtype}")
        V.same_device(q, "q", key_positions=key_positions)
        if tuple(key_positions.shape) not in ((B, S), (S,)):
            raise ValueError(f"key_positions must be [{B}, {S}] or [{S}] (one position per logical slot, the "
                             f"new tokens' slots included); got {list(key_positions.shape)}")
    if isinstance(position_map, VistaRoPE):
        position_map.check_visual((B, S), q.device, "one flag per logical cache slot, [B, S_max]")


def _keys_pos(key_positions, S: int, device) -> torch.Tensor:
    """[rows, S] key positions (int64 for "slots" and int tensors, else the float tensor)."""
    if isinstance(key_positions, str):
        return torch.arange(S, device=device, dtype=torch.int64)[None]
    kp = key_positions if key_positions.dim() == 2 else key_positions[None]
    return kp.to(torch.int64) if not kp.is_floating_point() else kp


def _table(pos, inv, a, backend):
    from posattn.rope.table import cos_sin_table

    return cos_sin_table(pos.reshape(-1), inv, a, backend=backend)


def _key_tables(rope, position_map, key_positions, S, device, backend):
    """(ktab, ktab_far, kpos): tables [2, rows, S, R/2] fp32, kpos fp64 [rows, S] (maps)."""
    t = rope.tables(device)
    inv, a = t.inv_freq.to(torch.float32).contiguous(), float(t.attention_scaling)
    kp = _keys_pos(key_positions, S, device)
    rows = kp.shape[0]
    ktab = _table(kp, inv, a, backend).reshape(2, rows, S, inv.shape[0])
    if position_map is None:
        return ktab, None, None
    if isinstance(position_map, (ReRoPE, VistaRoPE)):   # far_k = 0 for every key: one table row, read by all
        far = _table(torch.zeros(1, dtype=torch.int64, device=device), inv, a, backend).reshape(2, 1, 1, -1)
    else:
        far = _table(position_map.far_k(kp), inv, a, backend).reshape(2, rows, S, inv.shape[0])
    return ktab, far, kp.to(torch.float64).contiguous()


def lower(rope, key_positions, qk_precision, position_map, q3, positions, cache_seqlens, req, idx, S: int,
          backend: str, store: dict) -> DecodeRotary:
    """The DecodeRotary of one call. q3 [T, Hq, D]; positions [T] or None; req/idx int64 [T] (each
    token's request and index); ``store``: the plan's dict for signature-only tables ("slots")."""
    from posattn.kernels.reference.select_scores import rotate_table
    from posattn.rope.table import cos_sin_table

    tb = _TABLE_BACKEND[backend]
    wide = torch.float64 if backend == "reference" else torch.float32
    dev = q3.device
    slots = cache_seqlens.to(torch.int64)[req] + idx                          # [T] logical slot of each token
    ktab = ktab_far = kpos = None
    if key_positions is not None:
        if isinstance(key_positions, str) and "k" in store:
            ktab, ktab_far, kpos = store["k"]
        else:
            ktab, ktab_far, kpos = _key_tables(rope, position_map, key_positions, S, dev, tb)
            if isinstance(key_positions, str):
                store["k"] = (ktab, ktab_far, kpos)
    if positions is not None:
        qpos = positions.reshape(-1)
    elif key_positions is None or isinstance(key_positions, str):
        qpos = slots
    elif key_positions.dim() == 2:
        qpos = key_positions[req, slots]
    else:
        qpos = key_positions[slots]
    t = rope.tables(dev)
    inv, a = t.inv_freq.to(torch.float32).contiguous(), float(t.attention_scaling)
    R = rope.rotary_dim if rope.rotary_dim is not None else q3.shape[-1]
    inter = bool(rope.interleaved)

    def rot_q(pos):
        tab = cos_sin_table(pos, inv, a, backend=tb).to(wide)
        return rotate_table(q3.to(wide), tab[0][:, None, :], tab[1][:, None, :], R, inter).contiguous()

    out = DecodeRotary(qn=rot_q(qpos), ktab=ktab, rotary_dim=R, interleaved=inter,
                       qkp=QK_PRECISIONS.index(qk_precision))
    if position_map is not None:
        out.map_code, out.window = position_map.code, position_map.window_or_zero
        out.qf = rot_q(position_map.far_q(qpos))
        out.ktab_far, out.kpos = ktab_far, kpos
        out.qpos = qpos.to(torch.float64).contiguous()
        if position_map.code == VISTA:
            out.visual = position_map.visual.view(torch.uint8)
    return out

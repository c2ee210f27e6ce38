"""How far bf16 pipelines move a RoPE attention score with the absolute position (issue 15).

One query/key pair at distance 16 (the same bf16 content every time) is placed at absolute
positions p and p + 16 for p swept log-uniformly over [16, 2^20]; RoPE makes the exact score
independent of p. For each pipeline we report, over the sweep, the spread (max - min) of the
score and its largest deviation from the exact score (fp64 angles reduced exactly, fp64
products of the bf16 inputs):

  transformers bf16        transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb in bf16
                           (cos/sin rounded to bf16), then posattn's bf16 attention
  apply_rope + bf16 attn   posattn.apply_rope (exact angles, rotated q/k rounded once to bf16),
                           then posattn.anchor_attention without rope
  fused "bf16"             anchor_attention(rope=..., qk_precision="bf16")
  fused "bf16x3"           anchor_attention(rope=..., qk_precision="bf16x3"): fp32 rotation in
                           the kernel, QK^T = hi.hi + hi.lo + lo.hi
  fused "fp32"             anchor_attention(rope=..., qk_precision="fp32")

The score is read from the attention op itself: each pair is a 2-token document [key at p,
query at p + 16] whose query's own key is zero, so lse = log(exp(s) + 1) and s = log(expm1(lse)).
All pairs go through one call. D 128, base 5e5, |score| ~ 4.4 by default.

    python benchmarks/bf16_drift.py [--backend triton|cpu|cuda-triton] [--points 256]

On a CPU the fused modes run on the Triton kernel under the interpreter (``--backend triton``,
the default there; the C++ kernel computes "bf16x3" in fp32); the interpreter casts fp32 to
bf16 by truncation, so fused "bf16" is also shown on the C++ kernel, which rounds to nearest
as a GPU does. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"   # before any kernel module is imported
    except Exception:
        pass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import posattn  # noqa: E402

D, BASE, DIST = 128, 5e5, 16


def content(target: float = 4.4, seed: int = 0):
    """bf16 q [D], k [D] whose exact score at distance DIST is about ``target``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(D, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    s = exact_score(q.to(torch.bfloat16), k.to(torch.bfloat16))
    c = math.sqrt(abs(target / s))
    return (q * c).to(torch.bfloat16), (k * c).to(torch.bfloat16)


def exact_score(q, k):
    """fp64 score of q at position DIST and k at 0 (angles exact: the reference's reduction)."""
    from posattn.kernels.reference import attention as ref

    spec = posattn.RopeSpec(D, base=BASE)
    x = torch.stack((k, q)).to(torch.float64)[:, None, :]                      # [2, 1, D]
    r = ref.rotate_thd(x, torch.tensor([0, DIST]), spec.inv_freq(), D, False)
    return float((r[0, 0] * r[1, 0]).sum()) * D ** -0.5


def packed(q, k, starts, device):
    """q/k/v [2N, 1, D], cu_seqlens, positions [2N] of N pairs (key at p, query at p + DIST)."""
    n = starts.shape[0]
    qq = torch.zeros(2 * n, 1, D, dtype=torch.bfloat16)
    kk = torch.zeros(2 * n, 1, D, dtype=torch.bfloat16)
    qq[1::2, 0] = q
    kk[0::2, 0] = k
    v = torch.zeros(2 * n, 1, D, dtype=torch.bfloat16)
    pos = torch.empty(2 * n, dtype=torch.int64)
    pos[0::2] = starts
    pos[1::2] = starts + DIST
    cu = torch.arange(0, 2 * n + 1, 2, dtype=torch.int32)
    return qq.to(device), kk.to(device), v.to(device), cu.to(device), pos.to(device)


def scores_from_lse(lse):
    return torch.log(torch.expm1(lse[0, 1::2].double())).cpu()


def run_fused(q, k, starts, device, backend, mode):
    qq, kk, v, cu, pos = packed(q, k, starts, device)
    _, lse = posattn.anchor_attention(qq, kk, v, cu, num_anchors=0, rope=posattn.RopeSpec(D, base=BASE),
                                      positions=pos, return_lse=True, backend=backend, qk_precision=mode)
    return scores_from_lse(lse)


def run_apply_rope(q, k, starts, device, backend):
    qq, kk, v, cu, pos = packed(q, k, starts, device)
    qr, kr = posattn.apply_rope(qq, kk, pos, posattn.RopeSpec(D, base=BASE), layout="thd")
    _, lse = posattn.anchor_attention(qr, kr, v, cu, num_anchors=0, return_lse=True, backend=backend)
    return scores_from_lse(lse)


def run_transformers(q, k, starts, device, backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=D, num_attention_heads=1, num_key_value_heads=1, head_dim=D,
                      rope_theta=BASE, max_position_embeddings=1 << 21)
    rot = LlamaRotaryEmbedding(cfg).to(device)
    qq, kk, v, cu, pos = packed(q, k, starts, device)
    x = qq.transpose(0, 1)[None]                                           # [1, 1, 2N, D] (bhsd)
    cos, sin = rot(x, pos[None])                                           # bf16, as transformers hands them on
    qr, kr = apply_rotary_pos_emb(x, kk.transpose(0, 1)[None], cos, sin)
    qr, kr = (t[0].transpose(0, 1).contiguous() for t in (qr, kr))
    _, lse = posattn.anchor_attention(qr, kr, v, cu, num_anchors=0, return_lse=True, backend=backend)
    return scores_from_lse(lse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default=None, help="anchor_attention backend (default: triton)")
    ap.add_argument("--points", type=int, default=256, help="positions in the sweep")
    ap.add_argument("--max-log2", type=int, default=20, help="sweep up to 2^max_log2")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or "triton"
    q, k = content()
    exact = exact_score(q, k)
    starts = torch.unique(torch.logspace(math.log2(16), args.max_log2, args.points, base=2).round().long())
    rows = []
    pipelines = [("transformers bf16 (bf16 cos/sin)", lambda: run_transformers(q, k, starts, device, backend)),
                 ("`apply_rope` + bf16 attention", lambda: run_apply_rope(q, k, starts, device, backend))]
    pipelines += [(f'fused `"{m}"`', (lambda m=m: run_fused(q, k, starts, device, backend, m)))
                  for m in ("bf16", "bf16x3", "fp32")]
    if os.environ.get("TRITON_INTERPRET") and backend == "triton":
        # the interpreter's fp32 -> bf16 cast truncates; the C++ kernel rounds to nearest, as a GPU does
        pipelines.insert(3, ('fused `"bf16"`, C++ kernel (round to nearest)',
                             lambda: run_fused(q, k, starts, device, "cpu", "bf16")))
    for name, fn in pipelines:
        try:
            s = fn()
        except ImportError as e:
            rows.append(f"| {name} | n/a | n/a ({e.__class__.__name__}: {e}) |")
            continue
        rows.append(f"| {name} | {float(s.max() - s.min()):.2g} | {float((s - exact).abs().max()):.2g} |")
    interp = ", Triton interpreter" if os.environ.get("TRITON_INTERPRET") else ""
    print(f"Score of one q/k pair at distance {DIST} over {starts.numel()} absolute positions "
          f"{int(starts[0])}..{int(starts[-1])} (D {D}, base {BASE:g}, exact score {exact:.4f}; "
          f"attention backend {backend} on {device}{interp})")
    print()
    print("| pipeline | spread over positions | max deviation from exact |")
    print("|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

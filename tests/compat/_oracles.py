"""fp64 oracles of each library's documented rotary behaviour, written from the docs in our
own words (none of flash-attn, vLLM or FlashInfer is installed here)."""
import math

import torch


def rotate_rows(x, cos, sin, interleaved):
    """x [T, H, D] (any dtype); cos/sin fp64 [T, R/2] per token -> fp64 [T, H, D].
    Pairs (p, p + R/2) or (2p, 2p + 1): (a, b) -> (a cos - b sin, b cos + a sin)."""
    x = x.detach().double().cpu().clone()
    c, s = cos.double().cpu()[:, None, :], sin.double().cpu()[:, None, :]
    R = 2 * c.shape[-1]
    if interleaved:
        a, b = x[..., 0:R:2].clone(), x[..., 1:R:2].clone()
        x[..., 0:R:2], x[..., 1:R:2] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., : R // 2].clone(), x[..., R // 2 : R].clone()
        x[..., : R // 2], x[..., R // 2 : R] = a * c - b * s, b * c + a * s
    return x


def ragged_positions(indptr, offsets):
    """FlashInfer / flash-attn varlen: token t of segment i sits at offsets[i] + (t - indptr[i])."""
    out = []
    ind = [int(v) for v in indptr]
    for i in range(len(ind) - 1):
        off = int(offsets[i]) if isinstance(offsets, torch.Tensor) else int(offsets)
        out += [off + j for j in range(ind[i + 1] - ind[i])]
    return torch.tensor(out, dtype=torch.int64)


def flashinfer_freqs(rotary_dim, rope_scale, rope_theta, llama31=None):
    """FlashInfer's documented frequencies, written in the wavelength form of the Llama 3.1
    recipe; stored as fp32 like every library's inv_freq."""
    out = []
    for p in range(rotary_dim // 2):
        f = rope_theta ** (-2.0 * p / rotary_dim)
        if llama31 is None:
            out.append(f / rope_scale)
            continue
        low, high, old = llama31
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / rope_scale)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / rope_scale + smooth * f)
    return torch.tensor(out, dtype=torch.float64).float()


def tables_at(positions, inv_freq_fp32):
    ang = positions.double().cpu()[:, None] * inv_freq_fp32.double()[None, :]
    return ang.cos(), ang.sin()

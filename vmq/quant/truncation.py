"""Static truncation: the clipping range that minimises the Lp quantization error over a grid."""

from __future__ import annotations

import torch
from torch import Tensor

from vmq.quant.quantizers import act_qmax, fake_quant, range_to_qparams, weight_qmax


@torch.no_grad()
def weight_scale_search(w: Tensor, bits: int, p: float = 2.4, grid: int = 100) -> Tensor:
    """Per-output-channel symmetric step sizes: clip max|w| by i/grid, keep the best per channel."""
    qmax = weight_qmax(bits)
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for i in range(grid, 0, -1):
        scale = absmax * (i / grid) / qmax
        q = fake_quant(w, scale, None, -qmax, qmax)
        err = (q - w).abs().pow(p).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


@torch.no_grad()
def activation_range_search(x: Tensor, bits: int, p: float = 2.4, grid: int = 100, per_token: bool = True,
                            chunk_values: int = 1 << 20):
    """Clipped asymmetric ranges of activations ``x`` (samples, tokens, channels).

    Each token position (or the whole tensor) gets its own [lo, hi]: the observed range shrunk
    from both ends by ``i / grid`` (i < grid / 2), choosing the i with the smallest Lp error.
    Returns ``(lo, hi)`` of shape (tokens,) or (1,).

    The error of every candidate is ``fake_quant``'s arithmetic, computed in place on a few
    token positions at a time (``chunk_values`` values) so the working set stays in cache.
    """
    qmax = act_qmax(bits)
    xt = x.transpose(0, 1).reshape(x.shape[1], -1) if per_token else x.reshape(1, -1)  # (groups, values)
    lo0, hi0 = xt.amin(dim=1), xt.amax(dim=1)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    rows = max(1, chunk_values // xt.shape[1])
    for start in range(0, xt.shape[0], rows):
        part = xt[start:start + rows]
        l0, h0 = lo0[start:start + rows], hi0[start:start + rows]
        best_err = torch.full_like(l0, float("inf"))
        buf = torch.empty_like(part)
        for i in range(0, grid // 2):
            shrink = (h0 - l0) * (i / grid)
            lo, hi = l0 + shrink, h0 - shrink
            scale, zp = range_to_qparams(lo, hi, bits)
            scale, zp = scale[:, None], zp[:, None]
            # (clamp(round(x / scale) + zp, 0, qmax) - zp) * scale - x, as fake_quant computes it
            torch.div(part, scale, out=buf)
            buf.round_().add_(zp).clamp_(0, qmax).sub_(zp).mul_(scale).sub_(part).abs_().pow_(p)
            err = buf.sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo[start:start + rows] = torch.where(better, lo, best_lo[start:start + rows])
            best_hi[start:start + rows] = torch.where(better, hi, best_hi[start:start + rows])
    return best_lo, best_hi

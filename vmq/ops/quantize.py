"""Activation quantization to integers: the reference arithmetic for every backend.

``q = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1)`` stored as uint8, with
one (scale, zero point) per token: either per token position, shape (tokens,), shared by every
sample (per-token static), or per token of each sample, shape ``x.shape[:-1]`` (per-token
dynamic); broadcast over channels. A scale and its zero point are of one kind (the same number
of values): the kernels index both with one row index, so the twins refuse a mix as well.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vmq.ops.backend import use_native


def quantize_per_token_ref(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8) -> Tensor:
    """x (..., tokens, channels) float; scale, zero_point (tokens,) or x.shape[:-1] -> uint8 of x's shape."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    check_token_params(x, scale, zero_point)
    s, zp = per_token(scale, x), per_token(zero_point, x)
    q = torch.round(x.float() / s.float()) + zp.float()
    return torch.clamp(q, 0, 2 ** bits - 1).to(torch.uint8)


def quantize_per_token(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8,
                       backend: Optional[str] = None) -> Tensor:
    """:func:`quantize_per_token_ref` on the compiled kernel (``vmq::quantize_per_token``, bit-identical) or the twin."""
    takes = x.dtype == torch.float32 and x.dim() >= 2
    if not use_native("quantize_per_token", x, backend, takes=takes, why="takes float32 (..., tokens, channels)"):
        return quantize_per_token_ref(x, scale, zero_point, bits)
    check_token_params(x, scale, zero_point)  # same message as the twin
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    return torch.ops.vmq.quantize_per_token(x, scale.float(), zero_point, bits)


def range_to_qparams(lo: Tensor, hi: Tensor, bits: int, eps: float = 1e-8):
    """Asymmetric (scale, integer zero point) covering [lo, hi] (the range is widened to include 0).

    ``scale = max((hi - lo) / (2^bits - 1), eps)``, ``zero_point = clamp(round(-lo / scale), 0, 2^bits - 1)``
    (as fp32), elementwise: per token for dynamic quantization.
    """
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    qmax = 2 ** bits - 1
    scale = torch.clamp((hi - lo) / qmax, min=eps)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zp


def dequantize_per_token_ref(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.float() - per_token(zero_point, q).float()) * per_token(scale, q).float()


def check_per_token(t: Tensor, x: Tensor) -> None:
    """Raise unless ``t`` has shape (tokens,) or ``x.shape[:-1]``."""
    if t.shape != x.shape[-2:-1] and t.shape != x.shape[:-1]:
        raise ValueError(f"per-token parameters must be ({x.shape[-2]},) or {tuple(x.shape[:-1])}, "
                         f"got {tuple(t.shape)}")


def check_token_params(x: Tensor, *params: Optional[Tensor]) -> None:
    """Raise unless every given parameter has shape (tokens,) or ``x.shape[:-1]``, all with one size."""
    given = [t for t in params if t is not None]
    for t in given:
        check_per_token(t, x)
    if len({t.numel() for t in given}) > 1:
        raise ValueError("per-token parameters used together must be of one kind (all (tokens,) or all "
                         f"{tuple(x.shape[:-1])}), got {' and '.join(str(tuple(t.shape)) for t in given)}")


def per_token(t: Tensor, x: Tensor) -> Tensor:
    """``t`` of shape (tokens,) or ``x.shape[:-1]``, made broadcastable over ``x``'s channels."""
    check_per_token(t, x)
    return t.unsqueeze(-1)

"""Activation quantization to integers: the reference arithmetic for every backend.

``q = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1)`` stored as uint8, with
one (scale, zero point) per token position (per-token static) broadcast over channels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_per_token_ref(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8) -> Tensor:
    """x (..., tokens, channels) float; scale, zero_point (tokens,) -> uint8 of x's shape."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    if scale.shape != (x.shape[-2],) or zero_point.shape != scale.shape:
        raise ValueError(f"scale and zero_point must be ({x.shape[-2]},), got {tuple(scale.shape)}, "
                         f"{tuple(zero_point.shape)}")
    q = torch.round(x.float() / scale.float()[:, None]) + zero_point.float()[:, None]
    return torch.clamp(q, 0, 2 ** bits - 1).to(torch.uint8)


def dequantize_per_token_ref(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.float() - zero_point.float()[:, None]) * scale.float()[:, None]

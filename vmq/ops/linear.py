"""Integer linear layers: the reference arithmetic (``_ref``) that every kernel is held to.

``int8_linear_ref``: activations as uint8 with a per-token zero point and scale, weights as
int8 per output channel with a scale:

    acc[t, n] = sum_k (x_q[t, k] - zp[t]) * w_q[n, k]              exact integer (int32 range)
    y[t, n]   = acc[t, n] * (x_scale[t] * w_scale[n]) + bias[n]     fp32, in this order
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vmq.ops.quantize import per_token


def int8_matmul_ref(x_q: Tensor, x_zero_point: Tensor, w_q: Tensor) -> Tensor:
    """Exact ``sum_k (x_q - zp) * w_q`` as int32: x_q (..., T, K) uint8, zp (T,) or (..., T), w_q (N, K) int8."""
    if x_q.dtype != torch.uint8 or w_q.dtype != torch.int8:
        raise TypeError(f"expected uint8 activations and int8 weights, got {x_q.dtype} and {w_q.dtype}")
    if x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"inner dimensions differ: {x_q.shape[-1]} vs {w_q.shape[1]}")
    # float64 holds every partial sum exactly (|sum| < 2^53 for any realistic K)
    x = x_q.double() - per_token(x_zero_point, x_q).double()
    acc = x @ w_q.double().t()
    return acc.to(torch.int32)


def int8_linear_ref(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor] = None) -> Tensor:
    """Quantized linear with the fused-scale epilogue; returns fp32 (..., T, N). ``w_scale`` is (N,)."""
    acc = int8_matmul_ref(x_q, x_zero_point, w_q)
    y = acc.float() * (per_token(x_scale, x_q).float() * w_scale.float().reshape(-1))
    if bias is not None:
        y = y + bias.float()
    return y

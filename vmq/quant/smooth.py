"""SmoothQuant-style smoothing: move activation outliers into the weights, channel by channel.

For a linear layer ``y = x W^T`` and an input-channel scale ``s``: ``y = (x / s) (W * s)^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def smoothing_scale(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` (per input channel j)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=1e-5)
    w = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)

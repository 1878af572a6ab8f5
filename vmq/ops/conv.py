"""The depthwise causal conv1d + SiLU of a bidirectional Mamba layer, both directions.

Layouts: ``x`` (batch, d_inner, seqlen); each direction's kernel ``weight`` (d_inner, k) (an
``nn.Conv1d(groups=d_inner)`` weight without its middle dimension) and optional ``bias``
(d_inner,). The forward direction is causal; the backward one is causal in reversed time, which
the official Vim code computes as flip, conv, flip back:

    u[t]   = silu(bias   + sum_j weight[:, j]   * x[t - (k - 1) + j])     (zero before t = 0)
    u_b[t] = silu(bias_b + sum_j weight_b[:, j] * x[t + (k - 1) - j])     (zero after t = L - 1)

:func:`bidirectional_conv1d_silu_ref` is the definition (``F.conv1d`` on the flipped sequence);
:func:`bidirectional_conv1d_silu` runs the fused kernel ``vmq::bidirectional_conv1d_silu`` (both
directions in one pass over ``x``, no flipped copies, token-major outputs) or the twin.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.ops.backend import use_native


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, reverse: bool = False) -> Tensor:
    """One direction: ``silu`` of the depthwise causal conv (in reversed time when ``reverse``)."""
    d, k = weight.shape
    seqlen = x.shape[-1]
    xs = x.flip(-1) if reverse else x
    y = F.silu(F.conv1d(xs, weight.unsqueeze(1), bias, padding=k - 1, groups=d)[..., :seqlen])
    return y.flip(-1) if reverse else y


def bidirectional_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_b: Tensor,
                                  bias_b: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Twin of ``vmq::bidirectional_conv1d_silu``: ``(u, u_b)``, each (batch, d_inner, seqlen)."""
    return causal_conv1d_silu_ref(x, weight, bias), causal_conv1d_silu_ref(x, weight_b, bias_b, reverse=True)


def bidirectional_conv1d_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_b: Tensor,
                              bias_b: Optional[Tensor], backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Both directions' ``u`` in one call (see the module docstring); ``backend``: :mod:`vmq.ops.backend`.

    The kernel takes float32 tensors without gradients and kernels of at most 16 taps, and
    returns token-major storage viewed as (batch, d_inner, seqlen).
    """
    tensors = [t for t in (x, weight, bias, weight_b, bias_b) if t is not None]
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    takes = (all(t.dtype == torch.float32 for t in tensors) and not grads and x.dim() == 3
             and weight.dim() == 2 and weight.shape == weight_b.shape and weight.shape[-1] <= 16)
    if not use_native("bidirectional_conv1d_silu", x, backend, takes=takes,
                      why="takes float32 inputs without gradients and kernels of at most 16 taps"):
        return bidirectional_conv1d_silu_ref(x, weight, bias, weight_b, bias_b)
    return torch.ops.vmq.bidirectional_conv1d_silu(x, weight, bias, weight_b, bias_b)

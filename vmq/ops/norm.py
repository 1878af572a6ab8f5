"""RMSNorm: ``y = x * rsqrt(mean(x^2, -1) + eps) * weight`` in fp32.

:func:`rms_norm_ref` is the definition; :func:`rms_norm` runs the one-pass kernel
``vmq::rms_norm`` (same operations, the sum of squares in another order) or the twin.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vmq.ops.backend import use_native


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension, computed in fp32 and returned in ``x``'s dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: Optional[str] = None) -> Tensor:
    """:func:`rms_norm_ref` on the compiled kernel when ``backend`` picks one (see :mod:`vmq.ops.backend`)."""
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    takes = x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 1 and not grads
    if not use_native("rms_norm", x, backend, takes=takes, why="takes float32 inputs without gradients"):
        return rms_norm_ref(x, weight, eps)
    return torch.ops.vmq.rms_norm(x, weight, eps)

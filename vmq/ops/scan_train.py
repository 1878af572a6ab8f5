"""A trainable fused CPU selective scan (forward and backward in C++), built on first use.

Used to train vmq's reference models on a CPU, where the reference time loop's autograd graph
is far too slow. It has the exact contract of :func:`vmq.ops.scan.selective_scan_ref`, and a
test holds the two together (values and gradients). Building needs a C++ compiler and ninja.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops._cpu_ext import build

def load_extension():
    """Compile (once, cached by torch) and import the training scan extension."""
    return build("vmq_scan_train", "selective_scan_train.cpp")


def training_scan():
    """The fused differentiable CPU scan when it builds here, else None (callers fall back to the reference)."""
    try:
        load_extension()
    except VmqError:
        return None
    return selective_scan_fused_cpu


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ext = load_extension()
        ctx.save_for_backward(u, delta, A, B, C)
        return ext.fwd(u, delta, A, B, C)

    @staticmethod
    def backward(ctx, gy):
        ext = load_extension()
        return tuple(ext.bwd(*ctx.saved_tensors, gy))


def selective_scan_fused_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Same contract as ``selective_scan_ref``; differentiable in every input."""
    dtype_in = u.dtype
    u, delta, A = u.float().contiguous(), delta.float(), A.float().contiguous()
    if delta_softplus:
        delta = F.softplus(delta)
    Bt = B.float().transpose(1, 2).contiguous()
    Ct = C.float().transpose(1, 2).contiguous()
    y = _FusedScan.apply(u, delta.contiguous(), A, Bt, Ct)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)

"""A trainable fused CPU selective scan (forward and backward in C++: ``vmq::scan_train_fwd/bwd``).

Used to train vmq's reference models on a CPU, and by JLSS and the VQ search, where the
reference time loop's autograd graph is far too slow. It has the exact contract of
:func:`vmq.ops.scan.selective_scan_ref`, and a test holds the two together (values and
gradients). It needs the compiled extension ``vmq._C``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.backend import BUILD_FIX, native_status


def available() -> bool:
    return _library.has_kernel("scan_train_fwd", "cpu")


def training_scan():
    """The fused differentiable CPU scan when it is built, else None (callers fall back to the reference)."""
    return selective_scan_fused_cpu if available() else None


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        return torch.ops.vmq.scan_train_fwd(u, delta, A, B, C)

    @staticmethod
    def backward(ctx, gy):
        return tuple(torch.ops.vmq.scan_train_bwd(*ctx.saved_tensors, gy.contiguous()))


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
    if not available():
        raise VmqError(f"the fused training scan needs vmq._C, which is {native_status()}: {BUILD_FIX}")
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

"""The trainable one-direction scan: fused kernels (``vmq::scan_train_fwd/bwd``) or a fallback.

Used to train vmq's reference models, and by JLSS and the VQ search, where the reference time
loop's autograd graph is far too slow. :func:`selective_scan_fused` has the exact contract of
:func:`vmq.ops.scan_ref.selective_scan_ref`: softplus, the ``D`` skip and the ``z`` gate stay in
PyTorch autograd around the kernels' core recurrence

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,      y_t = <h_t, C_t>

on fp32 contiguous tensors, with ``B``, ``C`` token-major (batch, seqlen, d_state). The
dispatcher runs the CPU or the CUDA kernel of vmq._C by the tensors' device. The twins
:func:`scan_train_fwd_ref` (that recurrence through ``selective_scan_ref``) and
:func:`scan_train_bwd_ref` (its gradients) define the two ops; tests hold the kernels to them.

:func:`training_scan` picks the differentiable scan for a device: the fused scan where vmq._C
has its kernels for that device; on CUDA without them, mamba-ssm's ``selective_scan_fn`` when it
imports; else ``selective_scan_ref``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.backend import BUILD_FIX, native_status
from vmq.ops.scan_ref import check_scan_shapes, selective_scan_ref


def available(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether vmq._C has the fused training scan's kernels (forward and backward) for ``device``."""
    kind = torch.device(device).type
    return _library.has_kernel("scan_train_fwd", kind) and _library.has_kernel("scan_train_bwd", kind)


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan() -> Optional[Callable]:
    """mamba-ssm's ``selective_scan_fn``, or None when it is not installed (or installed without its CUDA build)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001  (an ImportError, or its CUDA extension failing to load)
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's ``selective_scan_fn`` imports (the ``mamba_ssm`` scan)."""
    return mamba_ssm_scan() is not None


def training_scan(device: Union[str, torch.device] = "cpu") -> Callable:
    """The differentiable one-direction scan for ``device`` (contract of ``selective_scan_ref``).

    :func:`selective_scan_fused` where vmq._C has its kernels for the device; on CUDA without
    them, mamba-ssm's ``selective_scan_fn`` when it imports; else the reference.
    """
    if available(device):
        return selective_scan_fused
    if torch.device(device).type == "cuda" and mamba_ssm_available():
        return mamba_ssm_scan()
    return selective_scan_ref


def scan_train_fwd_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Twin of ``vmq::scan_train_fwd``: the core recurrence, ``B``, ``C`` (batch, seqlen, d_state); y like ``u``."""
    return selective_scan_ref(u, delta, A, B.transpose(1, 2), C.transpose(1, 2))


def scan_train_bwd_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       grad_y: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Twin of ``vmq::scan_train_bwd``: the gradients of :func:`scan_train_fwd_ref` for ``grad_y``.

    Written out rather than taken from autograd, so that it also runs where autograd does not
    (below the dispatcher's autograd layer, e.g. under a TorchDispatchMode); a test holds it to
    autograd. With ``a_t = exp(delta_t A)`` and ``h_t = a_t h_{t-1} + delta_t u_t B_t``, a loop
    back in time carries ``g_t = dL/dh_t = grad_y_t C_t + a_{t+1} g_{t+1}``; then
    ``dC_t = sum_e grad_y_t h_t``, ``d(delta_t u_t B_t) = g_t`` and ``da_t = g_t h_{t-1}``,
    through ``a_t = exp(delta_t A)`` to ``delta`` and ``A``. fp32, like the forward twin.
    """
    dtypes = [t.dtype for t in (u, delta, A, B, C)]
    check_scan_shapes(u, delta, A, B.transpose(1, 2), C.transpose(1, 2))
    u, delta, A, B, C, gy = (t.float() for t in (u, delta, A, B, C, grad_y))
    seqlen = u.shape[-1]
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, e, l, n)
    dBu = (delta * u).unsqueeze(-1) * B[:, None]  # (b, e, l, n)
    h = u.new_zeros(*dA.shape[:2], A.shape[1])
    hs = []
    for t in range(seqlen):
        h = dA[:, :, t] * h + dBu[:, :, t]
        hs.append(h)
    g = torch.zeros_like(h)
    gs: list = [None] * seqlen
    for t in reversed(range(seqlen)):
        g = gy[:, :, t, None] * C[:, None, t] + g  # g arrives as a_{t+1} g_{t+1}
        gs[t] = g
        g = dA[:, :, t] * g
    H, G = torch.stack(hs, dim=2), torch.stack(gs, dim=2)  # (b, e, l, n)
    H_prev = torch.cat((torch.zeros_like(H[:, :, :1]), H[:, :, :-1]), dim=2)
    g_logit = G * H_prev * dA  # dL / d(delta_t A)
    g_bu = (G * B[:, None]).sum(-1)  # dL / d(delta_t u_t), (b, e, l)
    grads = (g_bu * delta,
             (g_logit * A[:, None, :]).sum(-1) + g_bu * u,
             (g_logit * delta.unsqueeze(-1)).sum((0, 2)),
             torch.einsum("beln,bel->bln", G, delta * u),
             torch.einsum("bel,beln->bln", gy, H))
    return tuple(t.to(dtype) for t, dtype in zip(grads, dtypes))


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        return torch.ops.vmq.scan_train_fwd(u, delta, A, B, C)

    @staticmethod
    def backward(ctx, gy):
        return tuple(torch.ops.vmq.scan_train_bwd(*ctx.saved_tensors, gy.contiguous()))


def selective_scan_fused(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Same contract as ``selective_scan_ref``; differentiable in every input; on the kernels of u's device."""
    if not available(u.device):
        if _library.NATIVE is None:
            raise VmqError(f"the fused training scan needs vmq._C, which is {native_status()}: {BUILD_FIX}")
        raise VmqError(f"vmq._C was built without the fused training scan's {u.device.type} kernels")
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

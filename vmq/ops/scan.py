"""The scans the models run: both directions of a bidirectional (bimamba v2) Mamba layer, and one-direction scans.

Layouts and arithmetic are those of :mod:`vmq.ops.scan_ref` (``selective_scan_ref`` is the
definition of one direction). A bidirectional Mamba layer runs the forward direction on t = 0..L-1 and
the backward one on t = L-1..0, every tensor in the original time order, and sums them:

    out = (y + y_b) / 2 * silu(z)          (no halving without divide_out; no gate without z)

* :func:`two_direction_scan`: that composition of any one-direction scan (the model uses it
  while a one-direction scan is swapped in, for training or mamba-ssm's as a baseline);
* :func:`bidirectional_scan_ref`: twin of ``vmq::bidirectional_scan`` with its arguments, i.e.
  int8 ``u`` / ``delta`` dequantized with their per-token scales, then the composition of
  ``selective_scan_ref``, fp32 out;
* :func:`bidirectional_scan`: the entry point at inference, the fused kernel (both directions in
  one pass, no flipped copies, optional int8 ``u`` / ``delta``) or the twin;
* :func:`one_direction_scan`: a one-direction scan by name (``reference``, ``train``,
  ``mamba_ssm``), each with the contract of ``selective_scan_ref``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops.backend import use_native
from vmq.ops.scan_ref import selective_scan_ref
from vmq.ops.scan_train import mamba_ssm_available  # noqa: F401  (re-exported: one of this module's scans)
from vmq.ops.scan_train import mamba_ssm_scan, training_scan

SCAN_IMPLS = ("reference", "train", "mamba_ssm")


def two_direction_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
    divide_out: bool = True,
    scan: Callable = selective_scan_ref,
) -> Tensor:
    """Both scan directions of a bidirectional Mamba layer, every tensor in the original time order.

    The forward direction runs t = 0..L-1 on ``(u, delta, A, B, C, D)``; the backward direction
    runs t = L-1..0 on ``(u_b, delta_b, A_b, B_b, C_b, D_b)``. The outputs are summed (halved when
    ``divide_out``) and gated once by ``silu(z)``, which equals gating each direction before the
    sum as the official code does. ``scan`` is the one-direction implementation to use.
    """
    y = scan(u, delta, A, B, C, D, z=None, delta_softplus=delta_softplus)
    y_b = scan(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, z=None,
               delta_softplus=delta_softplus).flip(-1)
    y = y + y_b
    if divide_out:
        y = y / 2
    if z is not None:
        y = y * F.silu(z.float()).to(y.dtype)
    return y


def dequantize_scan_input(q: Tensor, scale: Optional[Tensor]) -> Tensor:
    """fp32 value of a scan input: ``q`` itself, or int8 ``q`` (batch, d_inner, seqlen) times its per-token ``scale`` (seqlen,)."""
    if q.dtype == torch.int8:
        if scale is None or scale.shape != (q.shape[-1],):
            raise ValueError(f"int8 scan inputs need a per-token scale of shape ({q.shape[-1]},)")
        return q.float() * scale.float()
    if scale is not None:
        raise ValueError("a scale goes with int8 scan inputs only")
    return q


def bidirectional_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor], u_scale: Optional[Tensor], delta_scale: Optional[Tensor],
    u_b_scale: Optional[Tensor], delta_b_scale: Optional[Tensor], delta_softplus: bool, divide_out: bool,
) -> Tensor:
    """Twin of ``vmq::bidirectional_scan``: dequantize int8 inputs, then :func:`two_direction_scan` (fp32 out)."""
    u, delta = dequantize_scan_input(u, u_scale), dequantize_scan_input(delta, delta_scale)
    u_b, delta_b = dequantize_scan_input(u_b, u_b_scale), dequantize_scan_input(delta_b, delta_b_scale)
    return two_direction_scan(u.float(), delta.float(), A, B, C, D, u_b.float(), delta_b.float(), A_b, B_b, C_b,
                              D_b, z, delta_softplus, divide_out).float()


def bidirectional_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor] = None, delta_softplus: bool = False, divide_out: bool = True,
    u_scale: Optional[Tensor] = None, delta_scale: Optional[Tensor] = None,
    u_b_scale: Optional[Tensor] = None, delta_b_scale: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Both scan directions and the gate in one call; fp32 (batch, d_inner, seqlen).

    Same arithmetic as :func:`bidirectional_scan_ref` (the CPU kernel to fp32 rounding, the CUDA
    kernel to about 1e-5 relative: it uses the fast exponential). ``backend`` (see
    :mod:`vmq.ops.backend`): the fused kernel takes fp32 / int8 inputs without gradients, and
    on CUDA fp16 ones too (the state and the output stay fp32).
    """
    tensors = [t for t in (u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z) if t is not None]
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # float32 everywhere (u / delta may be int8); on CUDA also float16 u, delta, B, C and z
    floats = (torch.float32, torch.float16) if u.is_cuda else (torch.float32,)
    fdtype = B.dtype
    dtypes_ok = (fdtype in floats and all(t.dtype == fdtype for t in (C, B_b, C_b, z) if t is not None)
                 and all(t.dtype in (fdtype, torch.int8) for t in (u, delta, u_b, delta_b))
                 and (not u.is_cuda or all(t.dtype == u.dtype for t in (delta, u_b, delta_b)))
                 and all(t.dtype == torch.float32 for t in (A, D, A_b, D_b) if t is not None))
    if not use_native("bidirectional_scan", u, backend, takes=dtypes_ok and not grads,
                      why="takes float32 (or int8 u / delta; on CUDA float16) inputs without gradients"):
        return bidirectional_scan_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, u_scale,
                                      delta_scale, u_b_scale, delta_b_scale, delta_softplus, divide_out)
    return torch.ops.vmq.bidirectional_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, u_scale,
                                            delta_scale, u_b_scale, delta_b_scale, delta_softplus, divide_out)


def one_direction_scan(impl: str, device: Union[str, torch.device] = "cpu") -> Callable:
    """A one-direction scan with the contract of ``selective_scan_ref``, for tensors on ``device``.

    ``reference``: :func:`selective_scan_ref`; ``train``: :func:`vmq.ops.scan_train.training_scan`
    (differentiable; the fused kernels of vmq._C for the device when built); ``mamba_ssm``: mamba-ssm's
    ``selective_scan_fn`` (CUDA), or a VmqError when it is not installed.
    """
    if impl == "reference":
        return selective_scan_ref
    if impl == "train":
        return training_scan(device)
    if impl == "mamba_ssm":
        scan = mamba_ssm_scan()
        if scan is None:
            raise VmqError("the mamba_ssm scan needs mamba-ssm with its CUDA build (`pip install mamba-ssm`), "
                           "which does not import here")
        return scan
    raise ValueError(f"scan impl must be one of {', '.join(SCAN_IMPLS)}, got {impl!r}")

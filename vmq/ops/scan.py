"""Selective scan (the SSM recurrence of Mamba), one direction per call.

Layouts follow mamba-ssm's ``selective_scan_fn`` so that kernels can be compared one to one:

    u, delta, z : (batch, d_inner, seqlen)
    A           : (d_inner, d_state)
    B, C        : (batch, d_state, seqlen)
    D           : (d_inner,)

Arithmetic (fp32 throughout):

    delta  = softplus(delta)                        if delta_softplus
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = <h_t, C_t> + D * u_t
    out    = y * silu(z)                            if z is given

``selective_scan_ref`` is the definition: a plain time loop. ``bidirectional_scan_ref`` runs
both directions of a bimamba v2 mixer with it; :func:`bidirectional_scan` is the entry point the
models call at inference, which runs the fused kernel ``vmq::bidirectional_scan`` (both
directions in one pass, no flipped copies, optional int8 ``u`` / ``delta`` with per-token
scales) or the reference. (Training uses :mod:`vmq.ops.scan_train`, swapped in per model.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.ops.backend import use_native


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, d_inner, seqlen), got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, d_inner, seqlen = u.shape
    if A.shape[0] != d_inner or A.dim() != 2:
        raise ValueError(f"A must be (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, d_state, seqlen):
            raise ValueError(f"{name} must be ({batch}, {d_state}, {seqlen}), got {tuple(t.shape)}")


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The reference selective scan: a sequential loop over time, fp32 state."""
    _check(u, delta, A, B, C)
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, seqlen = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, e, l, n)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]  # (b, e, l, n)
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(seqlen):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan entry point used by the models (same contract as ``selective_scan_ref``)."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus)


def bidirectional_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor] = None,
    delta_softplus: bool = False,
    divide_out: bool = True,
    scan=selective_scan_ref,
) -> Tensor:
    """Both scan directions of a bimamba v2 mixer, every tensor in the original time order.

    The forward direction runs t = 0..L-1 on ``(u, delta, A, B, C, D)``; the backward direction
    runs t = L-1..0 on ``(u_b, delta_b, A_b, B_b, C_b, D_b)``. The outputs are summed (halved when
    ``divide_out``) and gated once by ``silu(z)``, which equals gating each direction before the
    sum as the official code does. ``scan`` is the one-direction implementation to use.
    """
    y = scan(u, delta, A, B, C, D, None, delta_softplus)
    y_b = scan(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, None, delta_softplus).flip(-1)
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


def bidirectional_scan_quantized_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor] = None, delta_softplus: bool = False, divide_out: bool = True,
    u_scale: Optional[Tensor] = None, delta_scale: Optional[Tensor] = None,
    u_b_scale: Optional[Tensor] = None, delta_b_scale: Optional[Tensor] = None,
) -> Tensor:
    """Twin of ``vmq::bidirectional_scan``: dequantize int8 inputs, then :func:`bidirectional_scan_ref` (fp32 out)."""
    u, delta = dequantize_scan_input(u, u_scale), dequantize_scan_input(delta, delta_scale)
    u_b, delta_b = dequantize_scan_input(u_b, u_b_scale), dequantize_scan_input(delta_b, delta_b_scale)
    return bidirectional_scan_ref(u.float(), delta.float(), A, B, C, D, u_b.float(), delta_b.float(), A_b, B_b, C_b,
                                  D_b, z, delta_softplus, divide_out).float()


def bidirectional_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor, D_b: Optional[Tensor],
    z: Optional[Tensor] = None, delta_softplus: bool = False, divide_out: bool = True,
    u_scale: Optional[Tensor] = None, delta_scale: Optional[Tensor] = None,
    u_b_scale: Optional[Tensor] = None, delta_b_scale: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Both scan directions and the gate in one call; fp32 (batch, d_inner, seqlen).

    Same arithmetic as :func:`bidirectional_scan_quantized_ref` (to fp32 rounding). ``backend``
    (see :mod:`vmq.ops.backend`): the fused kernel takes fp32 / int8 inputs without gradients,
    and on CUDA fp16 ones too (the state and the output stay fp32).
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
        return bidirectional_scan_quantized_ref(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z,
                                                delta_softplus, divide_out, u_scale, delta_scale, u_b_scale,
                                                delta_b_scale)
    return torch.ops.vmq.bidirectional_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, u_scale,
                                            delta_scale, u_b_scale, delta_b_scale, delta_softplus, divide_out)

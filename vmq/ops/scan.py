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

``selective_scan_ref`` is the definition: a plain time loop. ``selective_scan`` is the entry
point the models call; today it is the reference itself, and it is where compiled kernels
plug in. (Training uses :mod:`vmq.ops.scan_train`, swapped in per model.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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

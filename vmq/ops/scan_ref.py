"""The selective scan's definition (the SSM recurrence of Mamba), one direction per call.

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

:func:`selective_scan_ref` is that recurrence as a plain time loop: the contract every
one-direction scan (:mod:`vmq.ops.scan`, :mod:`vmq.ops.scan_train`) is held to.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def check_scan_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
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
    check_scan_shapes(u, delta, A, B, C)
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

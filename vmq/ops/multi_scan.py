"""The K-direction selective scan of every Visual Mamba family: one op, ``vmq::multi_scan``.

A multi-direction Mamba layer scans the same tokens in K orders, each with its own parameters,
and returns every direction's output in the original token order, summed, averaged or kept
apart. Vim's two directions are the identity and its reverse; VMamba's four are row-major,
column-major and their reverses; LocalMamba's are window orders and their flips (see
:mod:`vmq.models.scan_orders`).

**Orders.** ``out_index`` (K, S) int64: scan step ``s`` of direction ``k`` is output token
``out_index[k, s]`` in [0, seqlen), or -1 when that step is a padding step whose output is dropped
(LocalMamba's windows on grids they do not tile). Each token appears at most once per direction.
``in_index`` (K, S) int64: the input position each step reads, or -1 for a padding step whose
inputs are zero (``u = 0``, ``delta = 0`` before ``delta_bias``, ``B = C = 0``: the state only
decays there). ``in_index=None``: the inputs are already in scan order, position ``s`` at step ``s``
(LocalVim, whose causal conv runs in scan order).

**Inputs** (one tensor per direction, so that K directions can share one ``u`` without a copy and
each keeps its own strides):

    u[k], delta[k]   (batch, d_inner, S_in)   fp32, or int8 with u_scale / delta_scale (K, S_in)
    B[k], C[k]       (batch, d_state, S_in)   shared by the d_inner channels of direction k
    A                (K, d_inner, d_state)    fp32 (already -exp(A_log))
    D, delta_bias    (K, d_inner)             optional
    z                (batch, d_inner, seqlen) optional gate silu(z), in token order

**Arithmetic** per direction (that of :func:`vmq.ops.scan_ref.selective_scan_ref`):

    dt_s = softplus(delta_s + delta_bias)        (softplus only when delta_softplus)
    h_s  = exp(dt_s A) h_{s-1} + dt_s u_s B_s,   y_s = <h_s, C_s> + D u_s

then ``y`` of step s goes to token ``out_index[k, s]``; ``merge``: ``sum`` or ``mean`` over the K
directions -> (batch, d_inner, seqlen), or ``none`` -> (batch, K, d_inner, seqlen); times
``silu(z)`` when given. fp32 out.

* :func:`multi_scan_ref`: the twin of ``vmq::multi_scan`` (the schema's arguments): dequantize,
  then :func:`multi_direction_scan` with :func:`selective_scan_ref`;
* :func:`multi_direction_scan`: that composition for any one-direction scan (gather each
  direction's inputs into scan order, scan, scatter back): the training path, differentiable with
  :func:`vmq.ops.scan_train.training_scan`;
* :func:`multi_scan`: the entry point at inference, the fused kernel (orders read in place,
  nothing gathered or copied) or the twin.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.ops.backend import use_native
from vmq.ops.scan_ref import selective_scan_ref

MERGES = ("sum", "mean", "none")


def check_multi_scan(u: Sequence[Tensor], delta: Sequence[Tensor], A: Tensor, B: Sequence[Tensor],
                     C: Sequence[Tensor], D: Optional[Tensor], delta_bias: Optional[Tensor], z: Optional[Tensor],
                     in_index: Optional[Tensor], out_index: Tensor, seqlen: int, merge: str) -> None:
    """ValueError unless the arguments have the shapes of the contract above."""
    K = len(u)
    if not (K >= 1 and len(delta) == len(B) == len(C) == K):
        raise ValueError(f"u, delta, B and C need one tensor per direction, got {len(u)}, {len(delta)}, {len(B)}, {len(C)}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    if u[0].dim() != 3:
        raise ValueError(f"u[k] must be (batch, d_inner, seqlen), got {tuple(u[0].shape)}")
    batch, d_inner, s_in = u[0].shape
    if A.dim() != 3 or A.shape[:2] != (K, d_inner):
        raise ValueError(f"A must be ({K}, {d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[2]
    for k in range(K):
        if u[k].shape != (batch, d_inner, s_in) or delta[k].shape != (batch, d_inner, s_in):
            raise ValueError(f"u[{k}] and delta[{k}] must be ({batch}, {d_inner}, {s_in})")
        if B[k].shape != (batch, d_state, s_in) or C[k].shape != (batch, d_state, s_in):
            raise ValueError(f"B[{k}] and C[{k}] must be ({batch}, {d_state}, {s_in})")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (K, d_inner):
            raise ValueError(f"{name} must be ({K}, {d_inner}), got {tuple(t.shape)}")
    if out_index.dim() != 2 or out_index.shape[0] != K:
        raise ValueError(f"out_index must be ({K}, steps), got {tuple(out_index.shape)}")
    if in_index is not None and in_index.shape != out_index.shape:
        raise ValueError(f"in_index must have out_index's shape {tuple(out_index.shape)}, got {tuple(in_index.shape)}")
    if in_index is None and s_in != out_index.shape[1]:
        raise ValueError(f"inputs in scan order need {out_index.shape[1]} positions, got {s_in}")
    if z is not None and z.shape != (batch, d_inner, seqlen):
        raise ValueError(f"z must be ({batch}, {d_inner}, {seqlen}), got {tuple(z.shape)}")


def gather_steps(x: Tensor, index: Optional[Tensor]) -> Tensor:
    """``x`` (..., S_in) at the positions ``index`` (S,), zero where ``index`` is -1 (padding steps).

    Whether there is padding is never read on the host (that would stall a GPU every call): the
    padding steps read position 0 and are zeroed."""
    if index is None:
        return x
    return x.index_select(-1, index.clamp(min=0)).masked_fill(index < 0, 0)


def _scatter(y: Tensor, index: Tensor, seqlen: int) -> Tensor:
    """``y`` (..., S) in scan order put back in token order (..., seqlen); padding steps dropped
    (written to one extra position that is cut off, so that no mask is read on the host)."""
    out = y.new_zeros(*y.shape[:-1], seqlen + 1)
    return out.index_copy(-1, torch.where(index >= 0, index, seqlen), y)[..., :seqlen]


def multi_direction_scan(
    u: Sequence[Tensor], delta: Sequence[Tensor], A: Tensor, B: Sequence[Tensor], C: Sequence[Tensor],
    D: Optional[Tensor], delta_bias: Optional[Tensor], z: Optional[Tensor], in_index: Optional[Tensor],
    out_index: Tensor, seqlen: int, delta_softplus: bool, merge: str, scan: Callable = selective_scan_ref,
) -> Tensor:
    """K directions by a one-direction ``scan`` (contract of ``selective_scan_ref``); float inputs.

    Each direction's inputs are gathered into scan order, scanned, and its output scattered
    back to token order; differentiable when ``scan`` is.
    """
    check_multi_scan(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, seqlen, merge)
    ys = []
    for k in range(len(u)):
        idx = None if in_index is None else in_index[k]
        dk = gather_steps(delta[k], idx)
        if delta_bias is not None:
            dk = dk + delta_bias[k].to(dk.dtype)[None, :, None]
        y = scan(gather_steps(u[k], idx), dk, A[k], gather_steps(B[k], idx), gather_steps(C[k], idx),
                 None if D is None else D[k], z=None, delta_softplus=delta_softplus)
        ys.append(_scatter(y, out_index[k], seqlen))
    if merge == "none":
        out = torch.stack(ys, dim=1)
        gate_dim = 1
    else:
        out = torch.stack(ys).sum(0)
        if merge == "mean":
            out = out / len(ys)
        gate_dim = None
    if z is not None:
        g = F.silu(z.float()).to(out.dtype)
        out = out * (g.unsqueeze(gate_dim) if gate_dim is not None else g)
    return out


def _dequantize(x: Sequence[Tensor], scale: Optional[Tensor]) -> List[Tensor]:
    if scale is None:
        if any(t.dtype == torch.int8 for t in x):
            raise ValueError("int8 scan inputs need their per-position scales (K, S_in)")
        return [t.float() for t in x]
    if scale.shape != (len(x), x[0].shape[-1]):
        raise ValueError(f"a scale must be ({len(x)}, {x[0].shape[-1]}), got {tuple(scale.shape)}")
    if any(t.dtype != torch.int8 for t in x):
        raise ValueError("a scale goes with int8 scan inputs only")
    return [t.float() * s.float() for t, s in zip(x, scale)]


def multi_scan_ref(
    u: List[Tensor], delta: List[Tensor], A: Tensor, B: List[Tensor], C: List[Tensor], D: Optional[Tensor],
    delta_bias: Optional[Tensor], z: Optional[Tensor], in_index: Optional[Tensor], out_index: Tensor,
    u_scale: Optional[Tensor], delta_scale: Optional[Tensor], seqlen: int, delta_softplus: bool, merge: str,
) -> Tensor:
    """Twin of ``vmq::multi_scan``: dequantize int8 inputs, then :func:`multi_direction_scan` (fp32 out)."""
    u, delta = _dequantize(u, u_scale), _dequantize(delta, delta_scale)
    return multi_direction_scan(u, delta, A.float(), [b.float() for b in B], [c.float() for c in C],
                                None if D is None else D.float(), None if delta_bias is None else delta_bias.float(),
                                z, in_index, out_index, seqlen, delta_softplus, merge).float()


def multi_scan(
    u: Sequence[Tensor], delta: Sequence[Tensor], A: Tensor, B: Sequence[Tensor], C: Sequence[Tensor],
    D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, z: Optional[Tensor] = None,
    in_index: Optional[Tensor] = None, out_index: Optional[Tensor] = None, seqlen: Optional[int] = None,
    delta_softplus: bool = True, merge: str = "sum", u_scale: Optional[Tensor] = None,
    delta_scale: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tensor:
    """K scan directions (and the gate) in one call; fp32 in token order (see the module's contract).

    ``out_index`` is required; ``seqlen`` defaults to the inputs' length. Same arithmetic as
    :func:`multi_scan_ref` (the CPU kernel to fp32 rounding, the CUDA kernel to about 1e-5 relative:
    it uses the fast exponential). ``backend`` (see :mod:`vmq.ops.backend`): the fused
    kernel takes fp32 / int8 inputs without gradients (on CUDA fp16 u, delta, B, C and z too).
    """
    if out_index is None:
        raise ValueError("multi_scan needs out_index (K, steps)")
    u, delta, B, C = list(u), list(delta), list(B), list(C)
    seqlen = u[0].shape[-1] if seqlen is None else int(seqlen)
    check_multi_scan(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, seqlen, merge)
    tensors = [t for t in (*u, *delta, A, *B, *C, D, delta_bias, z) if t is not None]
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    floats = (torch.float32, torch.float16) if u[0].is_cuda else (torch.float32,)
    fdtype = B[0].dtype
    dtypes_ok = (fdtype in floats and all(t.dtype == fdtype for t in (*B, *C, z) if t is not None)
                 and all(t.dtype in (fdtype, torch.int8) for t in (*u, *delta))
                 and (not u[0].is_cuda or all(t.dtype == u[0].dtype for t in (*u, *delta)))
                 and all(t.dtype == torch.float32 for t in (A, D, delta_bias) if t is not None))
    if not use_native("multi_scan", u[0], backend, takes=dtypes_ok and not grads,
                      why="takes float32 (or int8 u / delta; on CUDA float16) inputs without gradients"):
        return multi_scan_ref(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, u_scale, delta_scale, seqlen,
                              delta_softplus, merge)
    return torch.ops.vmq.multi_scan(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, u_scale, delta_scale,
                                    seqlen, delta_softplus, merge)


__all__ = ["MERGES", "multi_scan", "multi_scan_ref", "multi_direction_scan", "check_multi_scan", "gather_steps"]

"""A trainable fused CPU selective scan (forward and backward in C++), built on first use.

Used to train vmq's reference models on a CPU, where the reference time loop's autograd graph
is far too slow. It has the exact contract of :func:`vmq.ops.scan.selective_scan_ref`, and a
test holds the two together (values and gradients). Building needs a C++ compiler and ninja.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError

_SRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "selective_scan_train.cpp"


@functools.lru_cache(maxsize=None)
def load_extension():
    """Compile (once, cached by torch) and import the training scan extension."""
    if not _SRC.is_file():
        raise VmqError(f"training scan source not found at {_SRC}: run from a source checkout of vmq")
    import logging

    # importing cpp_extension on a CUDA build without a CUDA runtime logs a warning that is
    # irrelevant here (this extension is CPU-only)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if os.environ.get("VMQ_NATIVE_ARCH", "1") == "1":
        flags.append("-march=native")
    try:
        return cpp_extension.load(name="vmq_scan_train", sources=[str(_SRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # compiler or ninja missing
        raise VmqError(f"could not build the training scan extension ({exc}); install a C++ compiler and "
                       "`pip install ninja`") from exc


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

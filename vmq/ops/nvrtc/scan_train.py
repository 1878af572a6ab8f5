"""NVRTC bindings of the training scan: scan_train_fwd and scan_train_bwd (``scan_train.cu``).

The Python twins of ``scan_train_bind.cpp`` (same checks, order and messages; the same outputs
and scratch), then the launches of ``launch_scan_train_fwd`` / ``launch_scan_train_bwd``, copied
in :func:`fwd_launch` and :func:`bwd_launches`: re-sync them when a launcher changes.
"""

from __future__ import annotations

import ctypes
from typing import List, Tuple

import torch
from torch import Tensor

from vmq.ops.nvrtc import structs as S
from vmq.ops.nvrtc.build import Kernel
from vmq.ops.nvrtc.common import (MAX_GRID_Y, ceil_div, check, check_cuda, dtype_name, is_cuda, not_supported, run,
                                  sizes)

THREADS = 64  # scan_train.cu: kThreads (channels per block)
CHUNK = 16  # launchers.h: kScanTrainChunk (tokens per checkpoint)
MAX_STATE = 64  # launchers.h: kScanTrainMaxState
STATES = (4, 16, MAX_STATE)  # the kernels' kMaxN
_CHECKS = (f'static_assert(vmq::cuda::kThreads == {THREADS} && vmq::cuda::kScanTrainChunk == {CHUNK} && '
           f'vmq::cuda::kScanTrainMaxState == {MAX_STATE}, "the training-scan launches of vmq/ops/nvrtc/'
           'scan_train.py");',)
_FWD = {n: Kernel("scan_train.cu", f"vmq::cuda::scan_train_fwd_kernel<{n}>", "vmq::cuda::ScanTrainArgs, float*, float*",
                  _CHECKS + tuple(S.size_checks(S.ScanTrainArgs))) for n in STATES}
_BWD = {n: Kernel("scan_train.cu", f"vmq::cuda::scan_train_bwd_kernel<{n}>",
                  "vmq::cuda::ScanTrainArgs, vmq::cuda::ScanTrainGrads",
                  _CHECKS + tuple(S.size_checks(S.ScanTrainArgs, S.ScanTrainGrads))) for n in STATES}
KERNELS = tuple(_FWD.values()) + tuple(_BWD.values())


# ---- launch configurations (the host launchers of scan_train.cu) --------------------------------

def _plan(a: S.ScanTrainArgs, op: str) -> Tuple[int, Tuple[int, int]]:
    """The kernels' kMaxN (4, 16 or 64 states) and grid: blocks of 64 channels on x, samples on y."""
    check(a.d_state <= MAX_STATE and a.batch <= MAX_GRID_Y, not_supported(op))
    states = next(n for n in STATES if a.d_state <= n)
    return states, (ceil_div(a.dim, THREADS), a.batch)


def _empty(a: S.ScanTrainArgs) -> bool:
    return a.batch == 0 or a.dim == 0 or a.len == 0


def fwd_launch(a: S.ScanTrainArgs, y: int):
    """launch_scan_train_fwd: one launch of the forward kernel, y written, no checkpoints."""
    if _empty(a):
        return None
    states, grid = _plan(a, "scan_train_fwd")
    return _FWD[states], grid, THREADS, (a, ctypes.c_void_p(y), ctypes.c_void_p(0))


def bwd_launches(a: S.ScanTrainArgs, g: S.ScanTrainGrads) -> List[tuple]:
    """launch_scan_train_bwd: the forward kernel storing the checkpoints (no y), then the backward
    one, on the same grid."""
    if _empty(a):
        return []
    states, grid = _plan(a, "scan_train_bwd")
    return [(_FWD[states], grid, THREADS, (a, ctypes.c_void_p(0), ctypes.c_void_p(g.ckpt or 0))),
            (_BWD[states], grid, THREADS, (a, g))]


# ---- bindings ---------------------------------------------------------------------------------

def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, op: str) -> S.ScanTrainArgs:
    """u, delta (batch, d_inner, seqlen); A (d_inner, d_state); B, C (batch, seqlen, d_state); fp32,
    contiguous, on u's device."""
    check(is_cuda(u), f"{op}: u must be a CUDA tensor")
    for t, name in ((u, "u"), (delta, "delta"), (A, "A"), (B, "B"), (C, "C")):
        check_cuda(t, u, op, name)
        check(t.dtype == torch.float32, f"{op}: {name} must be float32, got {dtype_name(t.dtype)}")
        check(t.is_contiguous(), f"{op}: {name} must be contiguous")
    check(u.dim() == 3 and delta.shape == u.shape,
          f"{op}: u and delta must be (batch, d_inner, seqlen), got {sizes(u)} and {sizes(delta)}")
    check(A.dim() == 2 and A.shape[0] == u.shape[1], f"{op}: A must be (d_inner, d_state), got {sizes(A)}")
    check(B.dim() == 3 and tuple(B.shape) == (u.shape[0], u.shape[2], A.shape[1]),
          f"{op}: B must be (batch, seqlen, d_state), got {sizes(B)}")
    check(C.shape == B.shape, f"{op}: C must be (batch, seqlen, d_state), got {sizes(C)}")
    check(A.shape[1] <= MAX_STATE, f"{op}: d_state up to {MAX_STATE} is supported, got {A.shape[1]}")
    check(u.shape[0] <= MAX_GRID_Y,
          f"{op}: batch up to 65535 is supported (one grid row per sample), got {u.shape[0]}")
    return S.ScanTrainArgs(u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), u.shape[0],
                           u.shape[1], u.shape[2], A.shape[1])


def scan_train_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    op = "scan_train_fwd"
    a = _check_inputs(u, delta, A, B, C, op)
    with torch.cuda.device(u.device):
        y = torch.empty_like(u)
        run(op, u.device, fwd_launch(a, y.data_ptr()))
    return y


def scan_train_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   grad_y: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    op = "scan_train_bwd"
    a = _check_inputs(u, delta, A, B, C, op)
    check_cuda(grad_y, u, op, "grad_y")
    check(grad_y.dtype == torch.float32 and grad_y.shape == u.shape, f"{op}: grad_y must be float32 (batch, d_inner, "
          f"seqlen) like u, got {dtype_name(grad_y.dtype)} {sizes(grad_y)}")
    with torch.cuda.device(u.device):
        gy = grad_y.contiguous()
        ckpt = torch.empty((a.batch, ceil_div(a.len, CHUNK), a.d_state, a.dim), dtype=torch.float32, device=u.device)
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA_part = torch.zeros((a.batch, a.d_state, a.dim), dtype=torch.float32, device=u.device)
        gB, gC = torch.zeros_like(B), torch.zeros_like(C)  # the kernel adds into them
        g = S.ScanTrainGrads(gy.data_ptr(), ckpt.data_ptr(), gu.data_ptr(), gdelta.data_ptr(), gA_part.data_ptr(),
                             gB.data_ptr(), gC.data_ptr())
        for plan in bwd_launches(a, g):
            run(op, u.device, plan)
        # dA: the per-sample parts summed over the batch, (d_state, d_inner) -> (d_inner, d_state)
        return gu, gdelta, gA_part.sum(0).t().contiguous(), gB, gC


IMPLS = {"scan_train_fwd": scan_train_fwd, "scan_train_bwd": scan_train_bwd}

"""NVRTC bindings of the scans: bidirectional_scan (``selective_scan.cu``) and multi_scan
(``multi_scan.cu``).

The Python twins of ``selective_scan_bind.cpp`` and ``multi_scan_bind.cpp`` (same checks, order
and messages; inputs read through their strides, as there), then the launches of
``launch_bidirectional_scan`` / ``launch_multi_scan``, copied in :func:`scan_launch` and
:func:`multi_scan_launches`: re-sync them when a launcher changes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from vmq.ops.nvrtc import structs as S
from vmq.ops.nvrtc.common import (MAX_GRID_Y, ceil_div, check, check_cuda, dtype_name, is_cuda, not_supported, run,
                                  sizes)
from vmq.ops.nvrtc.build import Kernel

SCAN_MAX_STATE = 64  # launchers.h: kScanMaxState
_TYPES = (("float", "float"), ("__half", "__half"), ("int8_t", "__half"), ("int8_t", "float"))  # (TV, TF) launched
_CONSTANTS = ('static_assert(vmq::cuda::kThreads == 128 && vmq::cuda::kScanMaxState == 64, '
              '"the scan launches of vmq/ops/nvrtc/scan.py");',)
_SCAN = {(tv, tf, n): Kernel("selective_scan.cu", f"vmq::cuda::bidirectional_scan_kernel<{tv}, {tf}, {n}>",
                             "vmq::cuda::ScanArgs",
                             _CONSTANTS + tuple(S.size_checks(S.ScanTensor, S.ScanDirection, S.ScanArgs)
                                                + S.enum_checks()))
         for tv, tf in _TYPES for n in (16, SCAN_MAX_STATE)}
_MULTI = {(tv, tf, n): Kernel("multi_scan.cu", f"vmq::cuda::multi_scan_kernel<{tv}, {tf}, {n}>",
                              "vmq::cuda::MultiScanArgs, vmq::cuda::Launch",
                              _CONSTANTS + (f"static_assert(vmq::cuda::kDirsPerLaunch == {S.DIRS_PER_LAUNCH}, "
                                            '"directions per launch");',)
                              + tuple(S.size_checks(S.ScanTensor, S.MultiScanDirection, S.MultiScanArgs,
                                                    S.MultiScanLaunch) + S.enum_checks()))
          for tv, tf in _TYPES for n in (4, 16, SCAN_MAX_STATE)}
KERNELS = tuple(_SCAN.values()) + tuple(_MULTI.values())
_TYPE_NAMES = {S.SCAN_TYPE["kFloat"]: "float", S.SCAN_TYPE["kHalf"]: "__half", S.SCAN_TYPE["kInt8"]: "int8_t"}


def _template_types(value_type: int, float_type: int):
    """(TV, TF) of the launchers' switch, or None where they return cudaErrorNotSupported."""
    tv, tf = _TYPE_NAMES[value_type], _TYPE_NAMES[float_type]
    return (tv, tf) if (tv, tf) in _TYPES else None


# ---- launch configurations (the host launchers of the .cu files) ---------------------------------

def scan_launch(a: S.ScanArgs):
    """launch_bidirectional_scan: 128 channels of one sample per block (grid: channel blocks x
    batch); d_state up to 16 or up to 64."""
    if a.batch == 0 or a.dim == 0 or a.len == 0:
        return None
    types = _template_types(a.value_type, a.float_type)
    check(types is not None and a.batch <= MAX_GRID_Y and a.d_state <= SCAN_MAX_STATE,
          not_supported("bidirectional_scan"))
    return _SCAN[(*types, 16 if a.d_state <= 16 else SCAN_MAX_STATE)], (ceil_div(a.dim, 128), a.batch), 128, (a,)


def multi_scan_launches(a: S.MultiScanArgs, dirs: Sequence[S.MultiScanDirection]):
    """launch_multi_scan: as the bidirectional scan, up to 8 directions per launch (the first
    zeroes the merged output, the last scales and gates it); d_state up to 4, 16 or 64."""
    if a.batch == 0 or a.dim == 0 or a.seqlen == 0:
        return []
    types = _template_types(a.value_type, a.float_type)
    check(types is not None and a.K >= 1 and a.batch <= MAX_GRID_Y and a.d_state <= SCAN_MAX_STATE,
          not_supported("multi_scan"))
    kernel = _MULTI[(*types, 4 if a.d_state <= 4 else 16 if a.d_state <= 16 else SCAN_MAX_STATE)]
    plans = []
    for k0 in range(0, a.K, S.DIRS_PER_LAUNCH):
        count = min(a.K - k0, S.DIRS_PER_LAUNCH)
        launch = S.fill(S.MultiScanLaunch(), k0=k0, count=count, first=k0 == 0, last=k0 + count == a.K)
        for j in range(count):
            launch.dir[j] = dirs[k0 + j]
        plans.append((kernel, (ceil_div(a.dim, 128), a.batch), 128, (a, launch)))
    return plans


# ---- bindings ---------------------------------------------------------------------------------

def _type_of(op: str, t: Tensor) -> int:
    names = {torch.float32: "kFloat", torch.float16: "kHalf", torch.int8: "kInt8"}
    check(t.dtype in names, f"{op}: inputs must be float32, float16 or int8, got {dtype_name(t.dtype)}")
    return S.SCAN_TYPE[names[t.dtype]]


def _view(t: Tensor) -> S.ScanTensor:
    return S.ScanTensor(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _check_value_types(op: str, value_type: int, float_type: int) -> None:
    kinds = S.SCAN_TYPE
    check(float_type != kinds["kInt8"], f"{op}: B and C must be float32 or float16")
    check(value_type != kinds["kFloat"] or float_type == kinds["kFloat"],
          f"{op}: float32 u and delta go with float32 B, C and z")
    check(value_type != kinds["kHalf"] or float_type == kinds["kHalf"],
          f"{op}: float16 u and delta go with float16 B, C and z")


def _per_token_scale(held: List[Tensor], x: Tensor, s: Optional[Tensor], name: str) -> int:
    op = "bidirectional_scan"
    if x.dtype != torch.int8:
        check(s is None, f"{op}: a scale goes with int8 {name} only")
        return 0
    check(s is not None, f"{op}: int8 {name} needs its per-token scale")
    check_cuda(s, x, op, "scale")
    check(s.dtype == torch.float32 and s.dim() == 1 and s.shape[0] == x.shape[2],
          f"{op}: the scale of {name} must be float32 (seqlen,)")
    held.append(s.contiguous())
    return held[-1].data_ptr()


def _direction(held, u, delta, A, B, C, D, u_scale, delta_scale, ref, value_type, float_type) -> S.ScanDirection:
    op = "bidirectional_scan"
    batch, dim, length = ref.shape
    for t in (u, delta):
        check_cuda(t, ref, op, "u / delta")
        check(t.shape == ref.shape, f"{op}: u and delta must be (batch, d_inner, seqlen) = {sizes(ref)}, got {sizes(t)}")
        check(_type_of(op, t) == value_type, f"{op}: u, delta, u_b and delta_b must share one dtype")
    check_cuda(A, ref, op, "A")
    check(A.dtype == torch.float32 and A.dim() == 2 and A.shape[0] == dim, f"{op}: A must be float32 (d_inner, d_state)")
    ns = A.shape[1]
    for t in (B, C):
        check_cuda(t, ref, op, "B / C")
        check(t.dim() == 3 and tuple(t.shape) == (batch, ns, length), f"{op}: B and C must be (batch, d_state, seqlen)")
        check(_type_of(op, t) == float_type, f"{op}: B, C and z must share one float dtype")
    held.append(A.contiguous())
    a_ptr, d_ptr = held[-1].data_ptr(), 0
    if D is not None:
        check_cuda(D, ref, op, "D")
        check(D.dtype == torch.float32 and D.numel() == dim, f"{op}: D must be float32 (d_inner,)")
        held.append(D.contiguous())
        d_ptr = held[-1].data_ptr()
    us = _per_token_scale(held, u, u_scale, "u")
    ds = _per_token_scale(held, delta, delta_scale, "delta")
    return S.ScanDirection(_view(u), _view(delta), _view(B), _view(C), us, ds, a_ptr, d_ptr)


def bidirectional_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, u_scale, delta_scale, u_b_scale,
                       delta_b_scale, delta_softplus, divide_out):
    op = "bidirectional_scan"
    check(is_cuda(u) and u.dim() == 3, f"{op}: u must be a CUDA tensor (batch, d_inner, seqlen)")
    check(u.shape[0] <= MAX_GRID_Y, f"{op}: the CUDA kernel takes up to 65535 samples (its grid's y), got {u.shape[0]}")
    check(A.dim() == 2 and A.shape[1] <= SCAN_MAX_STATE,
          f"{op}: d_state up to {SCAN_MAX_STATE} is supported, got {sizes(A)}")
    value_type, float_type = _type_of(op, u), _type_of(op, B)
    _check_value_types(op, value_type, float_type)
    with torch.cuda.device(u.device):
        held: List[Tensor] = []
        a = S.ScanArgs()
        a.fwd = _direction(held, u, delta, A, B, C, D, u_scale, delta_scale, u, value_type, float_type)
        check(A_b.shape == A.shape, f"{op}: A_b must be shaped like A")
        a.bwd = _direction(held, u_b, delta_b, A_b, B_b, C_b, D_b, u_b_scale, delta_b_scale, u, value_type, float_type)
        if z is not None:
            check_cuda(z, u, op, "z")
            check(z.shape == u.shape and _type_of(op, z) == float_type,
                  f"{op}: z must be (batch, d_inner, seqlen) in the dtype of B and C")
            a.z = _view(z)
        batch, dim, length = u.shape
        out = torch.empty((batch, length, dim), dtype=torch.float32, device=u.device)
        S.fill(a, value_type=value_type, float_type=float_type, batch=batch, dim=dim, len=length, d_state=A.shape[1],
               softplus=bool(delta_softplus), divide_out=bool(divide_out), out=out.data_ptr())
        run(op, u.device, scan_launch(a))
    return out.transpose(1, 2)  # (batch, d_inner, seqlen) view of the token-major result


def _parameter(held, t: Optional[Tensor], ref: Tensor, name: str, K: int, n: int) -> int:
    """A float32 (K, n) tensor on ref's device, contiguous; 0 for None."""
    op = "multi_scan"
    if t is None:
        return 0
    check_cuda(t, ref, op, name)
    check(t.dtype == torch.float32 and t.dim() == 2 and tuple(t.shape) == (K, n),
          f"{op}: {name} must be float32 ({K}, {n}), got {dtype_name(t.dtype)} {sizes(t)}")
    held.append(t.contiguous())
    return held[-1].data_ptr()


def _index(held, t: Tensor, ref: Tensor, name: str, K: int, steps: int) -> int:
    op = "multi_scan"
    check_cuda(t, ref, op, name)
    check(t.dtype == torch.int64 and t.dim() == 2 and tuple(t.shape) == (K, steps),
          f"{op}: {name} must be int64 ({K}, {steps}), got {dtype_name(t.dtype)} {sizes(t)}")
    held.append(t.contiguous())
    return held[-1].data_ptr()


def multi_scan(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, u_scale, delta_scale, seqlen, delta_softplus,
               merge):
    op = "multi_scan"
    K = len(u)
    check(K >= 1 and len(delta) == K and len(B) == K and len(C) == K,
          f"{op}: u, delta, B and C need one tensor per direction, got {K}, {len(delta)}, {len(B)}, {len(C)}")
    check(merge in ("sum", "mean", "none"), f"{op}: merge must be sum, mean or none, got {merge}")
    ref = u[0]
    check(is_cuda(ref) and ref.dim() == 3, f"{op}: u[k] must be CUDA tensors (batch, d_inner, positions)")
    check(seqlen >= 0, f"{op}: seqlen must be >= 0, got {seqlen}")
    batch, dim, positions = ref.shape
    check_cuda(A, ref, op, "A")
    check(A.dtype == torch.float32 and A.dim() == 3 and A.shape[0] == K and A.shape[1] == dim,
          f"{op}: A must be float32 ({K}, {dim}, d_state), got {sizes(A)}")
    ns = A.shape[2]
    check(ns <= SCAN_MAX_STATE, f"{op}: d_state up to {SCAN_MAX_STATE} is supported, got {ns}")
    check(batch <= MAX_GRID_Y, f"{op}: the CUDA kernel takes up to 65535 samples, got {batch}")
    value_type, float_type = _type_of(op, ref), _type_of(op, B[0])
    _check_value_types(op, value_type, float_type)
    int8 = value_type == S.SCAN_TYPE["kInt8"]
    check((u_scale is not None) == int8 and (delta_scale is not None) == int8,
          f"{op}: int8 u and delta need their scales (K, positions)" if int8
          else f"{op}: scales go with int8 u and delta only")
    with torch.cuda.device(ref.device):
        held: List[Tensor] = []
        us = _parameter(held, u_scale, ref, "u_scale", K, positions)
        ds = _parameter(held, delta_scale, ref, "delta_scale", K, positions)
        d_ptr = _parameter(held, D, ref, "D", K, dim)
        bias = _parameter(held, delta_bias, ref, "delta_bias", K, dim)
        held.append(A.contiguous())
        a_ptr = held[-1].data_ptr()
        check(out_index.dim() == 2 and out_index.shape[0] == K,
              f"{op}: out_index must be ({K}, steps), got {sizes(out_index)}")
        steps = out_index.shape[1]
        a = S.MultiScanArgs()
        a.out_index = _index(held, out_index, ref, "out_index", K, steps)
        if in_index is not None:
            a.in_index = _index(held, in_index, ref, "in_index", K, steps)
        else:
            check(positions == steps, f"{op}: inputs in scan order (no in_index) need {steps} positions, got {positions}")
        dirs = []
        for k in range(K):
            for t in (u[k], delta[k]):
                check_cuda(t, ref, op, "u / delta")
                check(t.shape == ref.shape, f"{op}: u[{k}] and delta[{k}] must be {sizes(ref)}, got {sizes(t)}")
                check(_type_of(op, t) == value_type, f"{op}: every u and delta must share one dtype")
            for t in (B[k], C[k]):
                check_cuda(t, ref, op, "B / C")
                check(t.dim() == 3 and tuple(t.shape) == (batch, ns, positions), f"{op}: B[{k}] and C[{k}] must be "
                      f"({batch}, {ns}, {positions}), got {sizes(t)}")
                check(_type_of(op, t) == float_type, f"{op}: B, C and z must share one float dtype")
            f4 = 4  # bytes of a float32: the per-direction offsets into (K, n) parameters
            dirs.append(S.MultiScanDirection(_view(u[k]), _view(delta[k]), _view(B[k]), _view(C[k]),
                                             us + f4 * k * positions if us else 0, ds + f4 * k * positions if ds else 0,
                                             a_ptr + f4 * k * dim * ns, d_ptr + f4 * k * dim if d_ptr else 0,
                                             bias + f4 * k * dim if bias else 0))
        if z is not None:
            check_cuda(z, ref, op, "z")
            check(z.dim() == 3 and tuple(z.shape) == (batch, dim, seqlen) and _type_of(op, z) == float_type,
                  f"{op}: z must be ({batch}, {dim}, {seqlen}) in the dtype of B and C")
            a.z = _view(z)
        apart = merge == "none"
        out = torch.empty((batch, K, seqlen, dim) if apart else (batch, seqlen, dim), dtype=torch.float32,
                          device=ref.device)
        # dirs: the host launcher's array, which no kernel reads (each launch carries its directions)
        S.fill(a, dirs=0, value_type=value_type, float_type=float_type, batch=batch, dim=dim, positions=positions,
               steps=steps, seqlen=seqlen, d_state=ns, K=K, softplus=bool(delta_softplus),
               merge=S.SCAN_MERGE[{"sum": "kSum", "mean": "kMean", "none": "kNone"}[merge]], out=out.data_ptr())
        for plan in multi_scan_launches(a, dirs):
            run(op, ref.device, plan)
    # (batch, [K,] d_inner, seqlen) view of the token-major result
    return out.transpose(2, 3) if apart else out.transpose(1, 2)


IMPLS = {"bidirectional_scan": bidirectional_scan, "multi_scan": multi_scan}

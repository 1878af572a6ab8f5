"""NVRTC bindings of the GEMM-like kernels: int8_linear, w4a8_linear, quantize_per_token
(``int8_gemm.cu``), vq_linear (``vq_gemm.cu``) and kmeans_assign (``kmeans_assign.cu``).

Each function is the Python twin of its C++ binding (``csrc/cuda/*_bind.cpp``): the same checks
in the same order with the same messages, the same contiguous copies and outputs, then the
launch that the ``.cu`` file's host launcher makes. The launch configurations are copied from
those launchers, one ``*_launch`` function per op: re-sync them when a launcher changes (the
build refuses a kernel whose parameters changed, see :mod:`vmq.ops.nvrtc.build`).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import torch
from torch import Tensor

from vmq.ops.nvrtc import structs as S
from vmq.ops.nvrtc.common import (MAX32, MAX_GRID_Y, ceil_div, check, check_cuda, check_tensor_cores, dtype_name,
                                  is_cuda, not_supported, ptr, rows, run, shape, sizes)
from vmq.ops.nvrtc.build import Kernel

_TILE = ('static_assert(vmq::cuda::tile::kBM == 64 && vmq::cuda::tile::kBN == 64 && vmq::cuda::tile::kThreads == '
         '128, "the GEMM tiles of vmq/ops/nvrtc/gemm.py");',)
_GEMM = tuple(Kernel("int8_gemm.cu", f"vmq::cuda::int_gemm_kernel<{bits}>", "vmq::cuda::GemmArgs, bool, bool",
                     _TILE + tuple(S.size_checks(S.GemmArgs))) for bits in (8, 4))
QUANT_THREADS = 256  # int8_gemm.cu: kQuantThreads
_QUANTIZE = Kernel("int8_gemm.cu", "vmq::cuda::quantize_kernel",
                   "const float*, const float*, const float*, uint8_t*, int64_t, int64_t, int64_t, float, int, bool",
                   (f'static_assert(vmq::cuda::kQuantThreads == {QUANT_THREADS}, "the quantize launch of '
                    'vmq/ops/nvrtc/gemm.py");',))
# vq_gemm_kernel<kBf16>: fp32 x runs on bfloat16 operands (kBf16), fp16 x on fp16 ones
_VQ = {bf16: Kernel("vq_gemm.cu", f"vmq::cuda::vq_gemm_kernel<{str(bf16).lower()}>", "vmq::cuda::VqGemmArgs",
                    _TILE + tuple(S.size_checks(S.VqGemmArgs))) for bf16 in (False, True)}
_KMEANS = tuple(Kernel("kmeans_assign.cu", f"vmq::cuda::kmeans_assign_kernel<{d}>",
                       "const float*, const float*, int64_t, const float*, int64_t, int64_t, int, int64_t*, float*",
                       ('static_assert(vmq::cuda::kThreads == 128 && vmq::cuda::kKmeansMaxDim == 32, '
                        '"the k-means launch of vmq/ops/nvrtc/gemm.py");',)) for d in (8, 32))
KERNELS = _GEMM + (_QUANTIZE,) + tuple(_VQ.values()) + _KMEANS
KMEANS_MAX_DIM = 32  # launchers.h: kKmeansMaxDim


# ---- launch configurations (the host launchers of the .cu files) ---------------------------------

def _tile_grid(m: int, n: int) -> tuple:
    """The GEMMs' grid: 64-row blocks on x, 64-channel blocks on y up to 65535 (the kernels loop
    over the channel blocks y, y + gridDim.y, ...)."""
    return ceil_div(m, 64), min(ceil_div(n, 64), MAX_GRID_Y)


def int_gemm_launch(a: S.GemmArgs, w_bits: int, op: str):
    """launch_int_gemm: 64 x 64 output tiles, 128 threads (:func:`_tile_grid`)."""
    if a.m == 0 or a.n == 0:
        return None
    check(w_bits in (8, 4), not_supported(op))
    vec_x = a.k % 16 == 0 and (a.x or 0) % 16 == 0
    vec_w = (a.k % 16 == 0 and (a.w or 0) % 16 == 0) if w_bits == 8 else ((a.k // 2) % 8 == 0 and (a.w or 0) % 8 == 0)
    return _GEMM[0 if w_bits == 8 else 1], _tile_grid(a.m, a.n), 128, (a, ctypes.c_bool(vec_x), ctypes.c_bool(vec_w))


def quantize_lanes_log2(cols: int) -> int:
    """Threads per row, log2: the fewest that hold the row at 4 values each, up to the whole block."""
    lanes_log2 = 0
    while (4 << lanes_log2) < cols and (1 << lanes_log2) < QUANT_THREADS:
        lanes_log2 += 1
    return lanes_log2


def quantize_launch(x: int, scale: int, zero_point: int, q: int, n_rows: int, cols: int, rows_per_param: int,
                    bits: int):
    """launch_quantize_per_token: 256 threads per block, 2^l per row (l = :func:`quantize_lanes_log2`);
    grid x: groups of 256 >> l rows, grid y: chunks of 4 << l columns (at most 65535, looping);
    vec: float4 loads where rows are multiples of 4 values, x 16-byte and q 4-byte aligned."""
    if n_rows == 0 or cols == 0:
        return None
    lanes_log2 = quantize_lanes_log2(cols)
    grid = (ceil_div(n_rows, QUANT_THREADS >> lanes_log2), min(ceil_div(cols, 4 << lanes_log2), MAX_GRID_Y))
    vec = cols % 4 == 0 and x % 16 == 0 and q % 4 == 0
    args = [ctypes.c_void_p(v) for v in (x, scale, zero_point, q)]
    args += [ctypes.c_int64(n_rows), ctypes.c_int64(cols), ctypes.c_int64(rows_per_param),
             ctypes.c_float(float((1 << bits) - 1)), ctypes.c_int(lanes_log2), ctypes.c_bool(vec)]
    return _QUANTIZE, grid, QUANT_THREADS, tuple(args)


def vq_gemm_launch(a: S.VqGemmArgs):
    """launch_vq_gemm: 64 x 64 output tiles, 128 threads (:func:`_tile_grid`); bfloat16 operands
    for fp32 x, fp16 ones for fp16 x."""
    if a.m == 0 or a.n == 0:
        return None
    return _VQ[not a.x_half], _tile_grid(a.m, a.n), 128, (a,)


def kmeans_launch(x: int, w: int, w_stride: int, c: int, n: int, k: int, d: int, codes: int, dist: int):
    """launch_kmeans_assign: one thread per point, 128 per block; d up to 8 or up to 32."""
    if n == 0:
        return None
    check(k != 0 and 1 <= d <= KMEANS_MAX_DIM, not_supported("kmeans_assign"))
    args = (ctypes.c_void_p(x), ctypes.c_void_p(w), ctypes.c_int64(w_stride), ctypes.c_void_p(c), ctypes.c_int64(n),
            ctypes.c_int64(k), ctypes.c_int(d), ctypes.c_void_p(codes), ctypes.c_void_p(dist))
    return _KMEANS[0 if d <= 8 else 1], (ceil_div(n, 128),), 128, args


# ---- bindings ---------------------------------------------------------------------------------

def _check_token_shape(p: Tensor, x: Tensor, op: str, name: str) -> None:
    """A per-token parameter: shape (tokens,) or x.shape[:-1] (vmq.ops.quantize.check_per_token)."""
    row_shape, tokens = tuple(x.shape[:-1]), x.shape[-2]
    check(tuple(p.shape) in ((tokens,), row_shape), f"{op}: {name} must be ({tokens},) or {shape(row_shape)} (one "
          f"value per token or per row), got {sizes(p)}")


def _check_per_token(p: Tensor, x: Tensor, dtype: torch.dtype, op: str, name: str) -> None:
    check_cuda(p, x, op, name)
    check(p.dtype == dtype, f"{op}: {name} must be {dtype_name(dtype)}, got {dtype_name(p.dtype)}")
    _check_token_shape(p, x, op, name)


def _int_linear(op: str, w_bits: int, x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w: Tensor, w_scale: Tensor,
                bias: Optional[Tensor], out_scale: Optional[Tensor], out_zero_point: Optional[Tensor], out_bits: int,
                w_sum: Optional[Tensor]) -> Tensor:
    check(is_cuda(x_q) and x_q.dtype == torch.uint8 and x_q.dim() >= 2,
          f"{op}: x_q must be a uint8 CUDA tensor (..., tokens, in_features)")
    w_name = "w_q" if w_bits == 8 else "w_packed"
    check_cuda(w, x_q, op, w_name)
    check(w.dim() == 2 and w.dtype == (torch.int8 if w_bits == 8 else torch.uint8), f"{op}: {w_name} must be "
          + ("int8 (out_features, in_features)" if w_bits == 8 else "uint8 (out_features, in_features / 2)"))
    check_tensor_cores(x_q, op)
    k, n, m = x_q.shape[-1], w.shape[0], rows(x_q)
    check(m * k <= MAX32 and n * k <= MAX32 and m * n <= MAX32, f"{op}: the CUDA kernel indexes with 32-bit offsets: "
          "rows x in_features, out_features x in_features and rows x out_features must each be below 2^31, got rows "
          f"{m}, in_features {k}, out_features {n}")
    if w_bits == 8:
        check(w.shape[1] == k, f"{op}: in_features differ: {k} vs {w.shape[1]}")
    else:
        check(k % 2 == 0 and w.shape[1] * 2 == k, f"{op}: w_packed must hold in_features / 2 bytes per row "
              f"(in_features even), got {sizes(w)} for in_features {k}")
    _check_per_token(x_scale, x_q, torch.float32, op, "x_scale")
    _check_per_token(x_zero_point, x_q, torch.int32, op, "x_zero_point")
    check(x_scale.numel() == x_zero_point.numel(), f"{op}: x_scale and x_zero_point must be of one kind (per token or "
          f"per row), got {sizes(x_scale)} and {sizes(x_zero_point)}")
    check_cuda(w_scale, x_q, op, "w_scale")
    check(w_scale.dtype == torch.float32 and w_scale.numel() == n, f"{op}: w_scale must be float32 (out_features,)")
    if bias is not None:
        check_cuda(bias, x_q, op, "bias")
        check(bias.dtype == torch.float32 and bias.numel() == n, f"{op}: bias must be float32 (out_features,)")
    check((out_scale is None) == (out_zero_point is None), f"{op}: out_scale and out_zero_point go together")
    if out_scale is not None:
        check(2 <= out_bits <= 8, f"{op}: out_bits must be 2..8, got {out_bits}")
        _check_per_token(out_scale, x_q, torch.float32, op, "out_scale")
        _check_per_token(out_zero_point, x_q, torch.int32, op, "out_zero_point")
        # the epilogue reads all four with one row index: out_zero_point[r] past its end otherwise
        check(out_scale.numel() == x_scale.numel() and out_zero_point.numel() == x_scale.numel(), f"{op}: out_scale "
              "and out_zero_point must be of x_scale's kind (all per token or all per row), got "
              f"{sizes(out_scale)} and {sizes(out_zero_point)} with x_scale {sizes(x_scale)}")
    if w_sum is not None:  # the layer's cached row sums; summed here when None
        check_cuda(w_sum, x_q, op, "w_sum")
        check(w_sum.dtype == torch.int32 and w_sum.dim() == 1 and w_sum.shape[0] == n, f"{op}: w_sum must be the "
              f"int32 ({n},) row sums of the weights, got {dtype_name(w_sum.dtype)} {sizes(w_sum)}")
    with torch.cuda.device(x_q.device):
        xc, wc, xs, xz, ws = (t.contiguous() for t in (x_q, w, x_scale, x_zero_point, w_scale))
        bc, os_, oz = (None if t is None else t.contiguous() for t in (bias, out_scale, out_zero_point))
        if w_sum is not None:
            sums = w_sum.contiguous()
        elif w_bits == 8:
            sums = wc.sum(1, dtype=torch.int32)
        else:
            p = wc.to(torch.int32)
            sums = ((((p & 15) ^ 8) - 8) + (((p >> 4) & 15) ^ 8) - 8).sum(1, dtype=torch.int32)
        out = torch.empty((*x_q.shape[:-1], n), dtype=torch.float32 if out_scale is None else torch.uint8,
                          device=x_q.device)
        a = S.fill(S.GemmArgs(), x=ptr(xc), w=ptr(wc), w_sum=ptr(sums), x_scale=ptr(xs), x_zero_point=ptr(xz),
                   w_scale=ptr(ws), bias=ptr(bc), out_scale=ptr(os_), out_zero_point=ptr(oz),
                   out_f=ptr(out) if out_scale is None else 0, out_q=0 if out_scale is None else ptr(out),
                   m=m, n=n, k=k, rows_per_param=xs.numel(), out_bits=out_bits)
        run(op, x_q.device, int_gemm_launch(a, w_bits, op))
    return out


def int8_linear(x_q, x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum=None):
    return _int_linear("int8_linear", 8, x_q, x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point,
                       out_bits, w_sum)


def w4a8_linear(x_q, x_scale, x_zero_point, w_packed, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum=None):
    return _int_linear("w4a8_linear", 4, x_q, x_scale, x_zero_point, w_packed, w_scale, bias, out_scale,
                       out_zero_point, out_bits, w_sum)


def quantize_per_token(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    op = "quantize_per_token"
    check(is_cuda(x) and x.dtype == torch.float32 and x.dim() >= 2,
          f"{op}: x must be a float32 CUDA tensor (..., tokens, channels)")
    check(2 <= bits <= 8, f"{op}: bits must be 2..8, got {bits}")
    c, m = x.shape[-1], rows(x)
    _check_per_token(scale, x, torch.float32, op, "scale")
    check_cuda(zero_point, x, op, "zero_point")
    check(zero_point.dtype in (torch.int32, torch.float32),
          f"{op}: zero_point must be int32 or float32, got {dtype_name(zero_point.dtype)}")
    _check_token_shape(zero_point, x, op, "zero_point")
    check(zero_point.numel() == scale.numel(), f"{op}: scale and zero_point must be of one kind (per token or per "
          f"row), got {sizes(scale)} and {sizes(zero_point)}")
    with torch.cuda.device(x.device):
        xc, sc, zc = x.contiguous(), scale.contiguous(), zero_point.to(torch.float32).contiguous()
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        run(op, x.device, quantize_launch(ptr(xc), ptr(sc), ptr(zc), ptr(q), m, c, sc.numel(), bits))
    return q


def vq_linear(x: Tensor, codes: Tensor, codebook: Tensor, rows_per_group: int, scale: Optional[Tensor],
              bias: Optional[Tensor]) -> Tensor:
    # the codes are not range-checked (a host synchronisation per call): vmq.layers.VQLinear checks
    # them once; the kernel reads an out-of-range code as NaN
    op = "vq_linear"
    check(is_cuda(x) and x.dtype in (torch.float32, torch.float16) and x.dim() >= 1,
          f"{op}: x must be a float32 or float16 CUDA tensor (..., in_features)")
    check_cuda(codes, x, op, "codes")
    check_cuda(codebook, x, op, "codebook")
    check(codes.dtype == torch.int32 and codes.dim() == 2, f"{op}: codes must be int32 (out_features, cols)")
    check(codebook.dtype == torch.float16 and codebook.dim() == 3, f"{op}: codebook must be float16 (groups, size, dim)")
    check_tensor_cores(x, op)
    k, (n, cols), (groups, size, dim), m = x.shape[-1], codes.shape, codebook.shape, rows(x)
    check(m * k <= MAX32 and m * n <= MAX32 and n * cols <= MAX32 and groups * size * dim <= MAX32, f"{op}: the CUDA "
          "kernel indexes with 32-bit offsets: x, the output, the codes and the codebooks must each hold fewer than "
          f"2^31 values, got x {sizes(x)}, codes {sizes(codes)}, codebook {sizes(codebook)}")
    check(cols * dim >= k and (cols - 1) * dim < k, f"{op}: {cols} codes of dim {dim} per row do not cover {k} inputs")
    check(rows_per_group >= 1 and ceil_div(n, rows_per_group) == groups, f"{op}: {n} rows in groups of "
          f"{rows_per_group} need {ceil_div(n, max(rows_per_group, 1))} codebooks, got {groups}")
    if scale is not None:
        check_cuda(scale, x, op, "scale")
        check(scale.dtype == torch.float16 and scale.numel() == n, f"{op}: scale must be float16 (out_features,)")
    if bias is not None:
        check_cuda(bias, x, op, "bias")
        check(bias.dtype == torch.float32 and bias.numel() == n, f"{op}: bias must be float32 (out_features,)")
    with torch.cuda.device(x.device):
        xc, cc, cbc = x.contiguous(), codes.contiguous(), codebook.contiguous()
        sc, bc = (None if t is None else t.contiguous() for t in (scale, bias))
        out = torch.empty((*x.shape[:-1], n), dtype=torch.float32, device=x.device)
        a = S.fill(S.VqGemmArgs(), x=ptr(xc), x_half=x.dtype == torch.float16, codes=ptr(cc), codebook=ptr(cbc),
                   scale=ptr(sc), bias=ptr(bc), out=ptr(out), m=m, n=n, k=k, cols=cols, size=size, dim=dim,
                   rows_per_group=rows_per_group)
        run(op, x.device, vq_gemm_launch(a))
    return out


def kmeans_assign(x: Tensor, w: Optional[Tensor], centroids: Tensor) -> Tuple[Tensor, Tensor]:
    op = "kmeans_assign"
    check(is_cuda(x) and x.dtype == torch.float32 and x.dim() == 2, f"{op}: points must be a float32 CUDA tensor (N, d)")
    n, d = x.shape
    check_cuda(centroids, x, op, "centroids")
    check(centroids.dtype == torch.float32 and centroids.dim() == 2 and centroids.shape[1] == d
          and centroids.shape[0] >= 1, f"{op}: centroids must be float32 (K >= 1, d)")
    check(1 <= d <= KMEANS_MAX_DIM, f"{op}: the CUDA kernel takes 1 to {KMEANS_MAX_DIM} dimensions, got {d}")
    with torch.cuda.device(x.device):
        xc, cc = x.contiguous(), centroids.contiguous()
        wc, w_stride = None, 0
        if w is not None:
            check_cuda(w, x, op, "w")
            check(w.dtype == torch.float32 and w.shape == x.shape, f"{op}: weights must be float32 shaped like the points")
            # a (d,) weight expanded over the points keeps row stride 0: no copy
            wc = w if (w.stride(1) == 1 and w.stride(0) in (0, d)) else w.contiguous()
            w_stride = wc.stride(0)
        codes = torch.empty(n, dtype=torch.int64, device=x.device)
        dist = torch.empty(n, dtype=torch.float32, device=x.device)
        run(op, x.device, kmeans_launch(ptr(xc), ptr(wc), w_stride, ptr(cc), n, cc.shape[0], d, ptr(codes),
                                            ptr(dist)))
    return codes, dist


IMPLS = {"int8_linear": int8_linear, "w4a8_linear": w4a8_linear, "quantize_per_token": quantize_per_token,
         "vq_linear": vq_linear, "kmeans_assign": kmeans_assign}

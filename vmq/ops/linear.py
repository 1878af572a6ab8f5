"""Integer linear layers: the reference arithmetic (``_ref``) that every kernel is held to.

``int8_linear_ref``: activations as uint8 with a per-token zero point and scale, weights as
int8 per output channel with a scale:

    acc[t, n] = sum_k (x_q[t, k] - zp[t]) * w_q[n, k]              exact integer (int32 range)
    y[t, n]   = acc[t, n] * (x_scale[t] * w_scale[n]) + bias[n]     fp32, in this order

and, with an output scale, ``y`` requantized to uint8 for the next layer with
:func:`vmq.ops.quantize.quantize_per_token_ref`. The per-token parameters (``x_scale``,
``x_zero_point``, ``out_scale``, ``out_zero_point``) are of one kind: all (T,) or all
``x_q.shape[:-1]``. ``w_sum``, optional, is the weight's int32 row sums (N,) for the zero-point
term ``zp[t] * w_sum[n]``; a layer that keeps its weights computes them once (when absent,
every call sums the weight). :func:`int8_linear` runs the compiled kernel
(``vmq::int8_linear``, bit-identical to the twin) or the twin.

``int8_linear_from_float_ref``: float activations divided by optional smoothing scales (one per
input channel), quantized per token with :func:`vmq.ops.quantize.quantize_per_token_ref`, then
``int8_linear_ref``; :func:`int8_linear_from_float` runs the fused kernel
(``vmq::int8_linear_from_float``: the quantization happens as rows enter the GEMM, no uint8
tensor in between; bit-identical) or the twin.

``w4a8_linear_ref``: the same with 4-bit weights packed two per byte by :func:`pack_int4`, shape
(N, K / 2): value ``k`` of a row goes to byte ``k // 2``, the low nibble for even ``k``, the high
one for odd ``k``, each as 4-bit two's complement (the bytes of ``vmq.pack.bits.pack_signed(w, 4)``
on the row-major weight); unpacked, it is ``int8_linear_ref``.

``vq_linear_ref``: vector-quantized weights. Row ``n`` of the weight is the concatenation of the
codewords ``codebook[n // rows_per_group, codes[n, j]]`` (fp16, d values each), cut to the input
width and multiplied by the row's fp16 scale when there is one; the product runs in fp32:

    w[n, j*d + i] = float(codebook[g(n), codes[n, j], i]) * float(scale[n])
    y[t, n]       = sum_k x[t, k] * w[n, k] + bias[n]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vmq.ops.backend import use_native
from vmq.ops.quantize import check_token_params, per_token, quantize_per_token_ref


def int8_matmul_ref(x_q: Tensor, x_zero_point: Tensor, w_q: Tensor, w_sum: Optional[Tensor] = None) -> Tensor:
    """Exact ``sum_k (x_q - zp) * w_q`` as int32: x_q (..., T, K) uint8, zp (T,) or (..., T), w_q (N, K) int8.

    With ``w_sum`` (int32 (N,), the row sums of ``w_q``): ``sum_k x_q * w_q - zp * w_sum``, the same
    value when ``w_sum`` is right (what the kernels compute).
    """
    if x_q.dtype != torch.uint8 or w_q.dtype != torch.int8:
        raise TypeError(f"expected uint8 activations and int8 weights, got {x_q.dtype} and {w_q.dtype}")
    if x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"inner dimensions differ: {x_q.shape[-1]} vs {w_q.shape[1]}")
    # float64 holds every partial sum exactly (|sum| < 2^53 for any realistic K)
    zp = per_token(x_zero_point, x_q).double()
    if w_sum is None:
        acc = (x_q.double() - zp) @ w_q.double().t()
    else:
        check_w_sum(w_sum, w_q)
        acc = x_q.double() @ w_q.double().t() - zp * w_sum.double()
    return acc.to(torch.int32)


def check_w_sum(w_sum: Tensor, w: Tensor) -> None:
    """Raise unless ``w_sum`` is an int32 (N,) tensor on the device of the weight ``w`` (N rows)."""
    if w_sum.dtype != torch.int32 or tuple(w_sum.shape) != (w.shape[0],) or w_sum.device != w.device:
        raise ValueError(f"w_sum must be int32 ({w.shape[0]},) on {w.device}, got {w_sum.dtype} "
                         f"{tuple(w_sum.shape)} on {w_sum.device}")


def check_epilogue(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, out_scale: Optional[Tensor],
                   out_zero_point: Optional[Tensor]) -> None:
    """The per-token parameters' contract (shared by the twins and the kernels): one kind for all four."""
    if (out_scale is None) != (out_zero_point is None):
        raise ValueError("out_scale and out_zero_point go together")
    check_token_params(x_q, x_scale, x_zero_point, out_scale, out_zero_point)


def int8_linear_ref(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_q: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                    out_zero_point: Optional[Tensor] = None, out_bits: int = 8,
                    w_sum: Optional[Tensor] = None) -> Tensor:
    """Quantized linear with the fused-scale epilogue; fp32 (..., T, N), or uint8 with ``out_scale``. ``w_scale`` is (N,)."""
    check_epilogue(x_q, x_scale, x_zero_point, out_scale, out_zero_point)
    acc = int8_matmul_ref(x_q, x_zero_point, w_q, w_sum)
    y = acc.float() * (per_token(x_scale, x_q).float() * w_scale.float().reshape(-1))
    if bias is not None:
        y = y + bias.float()
    if out_scale is not None:
        return quantize_per_token_ref(y, out_scale, out_zero_point, out_bits)
    return y


def int8_linear(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_q: Tensor, w_scale: Tensor,
                bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                out_zero_point: Optional[Tensor] = None, out_bits: int = 8, w_sum: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """:func:`int8_linear_ref` on the compiled kernel when ``backend`` picks one (see :mod:`vmq.ops.backend`)."""
    takes = x_q.dtype == torch.uint8 and w_q.dtype == torch.int8 and x_q.dim() >= 2
    if not use_native("int8_linear", x_q, backend, takes=takes, why="takes uint8 activations and int8 weights"):
        return int8_linear_ref(x_q, x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point, out_bits,
                               w_sum)
    check_epilogue(x_q, x_scale, x_zero_point, out_scale, out_zero_point)  # same message as the twin
    args = native_epilogue_args(w_q.shape[0], x_scale, x_zero_point, w_scale, bias, out_scale, out_zero_point)
    return torch.ops.vmq.int8_linear(x_q, args[0], args[1], w_q, *args[2:], out_bits, w_sum)


def int8_linear_from_float_ref(x: Tensor, smooth_scale: Optional[Tensor], x_scale: Tensor, x_zero_point: Tensor,
                               x_bits: int, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``int8_linear_ref(quantize_per_token_ref(x / smooth_scale, ...), ...)``: fp32 (..., T, N)."""
    x = x.float()
    if smooth_scale is not None:
        x = x / smooth_scale.float()
    x_q = quantize_per_token_ref(x, x_scale, x_zero_point, x_bits)
    return int8_linear_ref(x_q, x_scale, x_zero_point, w_q, w_scale, bias)


def int8_linear_from_float(x: Tensor, smooth_scale: Optional[Tensor], x_scale: Tensor, x_zero_point: Tensor,
                           x_bits: int, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                           backend: Optional[str] = None) -> Tensor:
    """:func:`int8_linear_from_float_ref` on the fused kernel when ``backend`` picks one (see :mod:`vmq.ops.backend`)."""
    if not 2 <= x_bits <= 8:
        raise ValueError(f"bits must be 2..8, got {x_bits}")
    takes = x.dtype == torch.float32 and w_q.dtype == torch.int8 and x.dim() >= 2
    if not use_native("int8_linear_from_float", x, backend, takes=takes,
                      why="takes float32 activations and int8 weights"):
        return int8_linear_from_float_ref(x, smooth_scale, x_scale, x_zero_point, x_bits, w_q, w_scale, bias)
    check_token_params(x, x_scale, x_zero_point)  # same message as the twin
    args = native_epilogue_args(w_q.shape[0], x_scale, x_zero_point, w_scale, bias, None, None)
    smooth = None if smooth_scale is None else smooth_scale.float()
    return torch.ops.vmq.int8_linear_from_float(x, smooth, args[0], args[1], x_bits, w_q, args[2], args[3])


def pack_int4(w_q: Tensor) -> Tensor:
    """int8 weights in [-8, 7], shape (N, K) with K even -> the (N, K / 2) uint8 layout of ``w4a8_linear``."""
    if w_q.dim() != 2 or w_q.shape[1] % 2:
        raise ValueError(f"4-bit packing needs (N, K) weights with K even, got {tuple(w_q.shape)}")
    v = w_q.to(torch.int64)
    if v.numel() and (v.min() < -8 or v.max() > 7):
        raise ValueError("values outside the 4-bit range [-8, 7]")
    nibbles = (v & 0xF).to(torch.uint8)  # two's complement, 4 bits
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4_ref(w_packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (N, K / 2) uint8 -> (N, K) int8."""
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"expected (N, K / 2) uint8 packed weights, got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, half = w_packed.shape
    lo, hi = (w_packed & 0xF).to(torch.int8), (w_packed >> 4).to(torch.int8)
    nibbles = torch.stack((lo, hi), dim=-1).reshape(n, half * 2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def w4a8_linear_ref(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_packed: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                    out_zero_point: Optional[Tensor] = None, out_bits: int = 8,
                    w_sum: Optional[Tensor] = None) -> Tensor:
    """:func:`int8_linear_ref` on 4-bit weights packed by :func:`pack_int4` (``w_sum``: row sums of the 4-bit values)."""
    return int8_linear_ref(x_q, x_scale, x_zero_point, unpack_int4_ref(w_packed), w_scale, bias, out_scale,
                           out_zero_point, out_bits, w_sum)


def w4a8_linear(x_q: Tensor, x_scale: Tensor, x_zero_point: Tensor, w_packed: Tensor, w_scale: Tensor,
                bias: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                out_zero_point: Optional[Tensor] = None, out_bits: int = 8, w_sum: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """:func:`w4a8_linear_ref` on the compiled kernel (``vmq::w4a8_linear``, bit-identical) or the twin."""
    takes = (x_q.dtype == torch.uint8 and w_packed.dtype == torch.uint8 and x_q.dim() >= 2
             and x_q.shape[-1] == 2 * w_packed.shape[-1])
    if not use_native("w4a8_linear", x_q, backend, takes=takes,
                      why="takes uint8 activations and (out_features, in_features / 2) packed 4-bit weights"):
        return w4a8_linear_ref(x_q, x_scale, x_zero_point, w_packed, w_scale, bias, out_scale, out_zero_point,
                               out_bits, w_sum)
    check_epilogue(x_q, x_scale, x_zero_point, out_scale, out_zero_point)  # same message as the twin
    args = native_epilogue_args(w_packed.shape[0], x_scale, x_zero_point, w_scale, bias, out_scale, out_zero_point)
    return torch.ops.vmq.w4a8_linear(x_q, args[0], args[1], w_packed, *args[2:], out_bits, w_sum)


def native_epilogue_args(n: int, x_scale, x_zero_point, w_scale, bias, out_scale, out_zero_point):
    """The epilogue tensors in the kernels' dtypes; per-tensor weight scales expanded to every channel."""
    f32 = lambda t: t if t is None or t.dtype == torch.float32 else t.float()  # noqa: E731  (no dispatch when already so)
    i32 = lambda t: t if t is None or t.dtype == torch.int32 else t.to(torch.int32)  # noqa: E731
    w_scale = f32(w_scale)
    if w_scale.dim() != 1:
        w_scale = w_scale.reshape(-1)
    if w_scale.numel() == 1 and n != 1:
        w_scale = w_scale.expand(n)
    return f32(x_scale), i32(x_zero_point), w_scale, f32(bias), f32(out_scale), i32(out_zero_point)


def vq_dequantize_ref(codes: Tensor, codebook: Tensor, in_features: int, rows_per_group: Optional[int] = None,
                      scale: Optional[Tensor] = None) -> Tensor:
    """The fp32 weight (N, in_features) of VQ ``codes`` (N, cols) into ``codebook`` (G, K, d).

    Row ``n`` uses codebook ``n // rows_per_group`` (``rows_per_group`` None: one codebook).
    """
    if codes.dim() != 2 or codebook.dim() != 3:
        raise ValueError(f"expected codes (N, cols) and codebook (G, K, d), got {tuple(codes.shape)} and "
                         f"{tuple(codebook.shape)}")
    n, cols = codes.shape
    groups, k, d = codebook.shape
    if cols * d < in_features or (cols - 1) * d >= in_features:
        raise ValueError(f"{cols} codes of dim {d} per row do not cover {in_features} inputs")
    rows_per_group = rows_per_group or n
    if -(-n // rows_per_group) != groups:
        raise ValueError(f"{n} rows in groups of {rows_per_group} need {-(-n // rows_per_group)} codebooks, "
                         f"got {groups}")
    g = (torch.arange(n, device=codes.device) // rows_per_group)[:, None]
    flat = codebook.reshape(groups * k, d)
    w = flat[(g * k + codes.long()).reshape(-1)].float().reshape(n, cols * d)[:, :in_features]
    if scale is not None:
        w = w * scale.float().reshape(-1, 1)
    return w


def vq_linear_ref(x: Tensor, codes: Tensor, codebook: Tensor, rows_per_group: Optional[int] = None,
                  scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Linear layer with VQ weights; ``x`` (..., in_features), returns fp32 (..., N)."""
    w = vq_dequantize_ref(codes, codebook, x.shape[-1], rows_per_group, scale)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y


def vq_linear(x: Tensor, codes: Tensor, codebook: Tensor, rows_per_group: Optional[int] = None,
              scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """:func:`vq_linear_ref` on the compiled kernel (``vmq::vq_linear``) or the twin.

    The CPU kernel decodes the weight and runs one matmul (equal to the twin to fp32 rounding).
    The CUDA kernel decodes tiles of codewords into shared memory and multiplies them on the
    tensor cores with fp32 accumulation, then applies the row scale and the bias:
    ``y[t, n] = scale[n] * sum_k x[t, k] * c[n, k] + bias[n]``. fp16 ``x`` and the fp16 codewords
    go in exactly (equal to the twin to fp32 rounding); fp32 ``x`` goes in as bfloat16, and the
    codewords with it (8 significant bits, about 3 significant digits, with the range of fp32):
    equal to the twin on bfloat16-rounded ``x`` and codewords to fp32 rounding. The CUDA kernel
    trusts ``codes`` to index the codebook (a check would synchronise with the host on every
    call): :class:`vmq.layers.VQLinear` checks them once when it is built or loaded; an
    out-of-range code reads as NaN rather than outside the codebook.
    """
    cuda_ok = x.dtype in (torch.float32, torch.float16) if x.is_cuda else x.dtype == torch.float32
    takes = cuda_ok and codes.dim() == 2 and codebook.dim() == 3 and x.dim() >= 1
    if not use_native("vq_linear", x, backend, takes=takes, why="takes float32 (or, on CUDA, float16) inputs"):
        return vq_linear_ref(x, codes, codebook, rows_per_group, scale, bias)
    return torch.ops.vmq.vq_linear(x, codes.to(torch.int32), codebook.half(), int(rows_per_group or codes.shape[0]),
                                   None if scale is None else scale.half(), None if bias is None else bias.float())

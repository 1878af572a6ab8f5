"""Kernel choice for the integer linear layer (:class:`vmq.layers.QuantizedLinear`): its routes and
their prepared arguments, in one place.

A layer holds int8 weights (2 to 8 bits used) with per-channel or per-tensor scales, optional
smoothing scales and bias, and quantizes its input per token: with static scales (one per token
position, or one per tensor) or dynamic ones (each token's own min/max). :class:`IntLinearKernels`
picks, per call and for the backend in force (:mod:`vmq.ops.backend`):

* static scales, where ``vmq::int8_linear_from_float`` is built for the device: smoothing,
  quantization and the GEMM in one kernel (no uint8 tensor in between);
* 4-bit weights on CUDA: ``quantize_per_token`` then ``vmq::w4a8_linear`` (two weights per byte,
  half the weight traffic);
* otherwise ``quantize_per_token`` then ``vmq::int8_linear``;
* weight-only layers (no activation bits): the dequantized weight in fp32.

All routes are bit-identical to ``int8_linear_ref`` applied to the quantized input. The fused
route's arguments, the 4-bit packed weights and the weight's row sums (the GEMMs' zero-point
term) are cached while the layer's tensors stay the same tensors at the same versions and on
the same device (at batch 1 preparing them costs as much as the kernel). The caches live here,
not in the layer's buffers: they follow ``.to(device)`` by being rebuilt, and packed files
never see them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.backend import resolve_backend
from vmq.ops.linear import int8_linear, native_epilogue_args, pack_int4, w4a8_linear
from vmq.ops.quantize import quantize_per_token, range_to_qparams


def _key(*tensors: Optional[Tensor]) -> tuple:
    return tuple((id(t), t._version, t.device) for t in tensors if t is not None)


class IntLinearKernels:
    """The routes of one integer linear layer, with its cached prepared arguments."""

    def __init__(self) -> None:
        self._fused = None  # (key, arguments of vmq::int8_linear_from_float after x)
        self._int4 = None  # (key, packed weight)
        self._w_sum = None  # (key, int32 row sums of the weight)

    def __call__(self, x: Tensor, weight: Tensor, weight_scale: Tensor, w_bits: int, a_bits: Optional[int],
                 a_strategy: Optional[str], input_scale: Optional[Tensor], input_zero_point: Optional[Tensor],
                 smooth_scale: Optional[Tensor], bias: Optional[Tensor], backend: Optional[str] = None) -> Tensor:
        backend = resolve_backend(backend)
        x = x.float()
        if a_bits is None:
            w = weight.float() * weight_scale.reshape(-1, 1)
            return F.linear(x if smooth_scale is None else x / smooth_scale, w, bias)
        tokens = x.shape[-2]
        if a_strategy == "token_dynamic":
            if smooth_scale is not None:
                x = x / smooth_scale
            scale, zp = range_to_qparams(x.amin(-1), x.amax(-1), a_bits)
        else:
            if a_strategy == "token_static" and input_scale.numel() != tokens:
                raise VmqError(f"per-token static scales were calibrated for {input_scale.numel()} tokens, "
                               f"the input has {tokens}")
            if self._fused_route(x, w_bits, backend):
                args = self._fused_arguments(tokens, weight, weight_scale, a_bits, input_scale, input_zero_point,
                                             smooth_scale, bias)
                return torch.ops.vmq.int8_linear_from_float(x, *args)
            scale, zp = input_scale.expand(tokens), input_zero_point.expand(tokens)
            if smooth_scale is not None:
                x = x / smooth_scale
        x_q = quantize_per_token(x, scale, zp, a_bits, backend=backend)
        w_sum = self._row_sums(weight)
        if self._int4_route(x_q, w_bits, weight, backend):
            return w4a8_linear(x_q, scale, zp, self._packed_int4(weight), weight_scale, bias, w_sum=w_sum,
                               backend=backend)
        return int8_linear(x_q, scale, zp, weight, weight_scale, bias, w_sum=w_sum, backend=backend)

    @staticmethod
    def _fused_route(x: Tensor, w_bits: int, backend: str) -> bool:
        """Static scales: the fused float-input kernel where it is built (4-bit weights on CUDA take the W4A8 kernel)."""
        return (backend in ("auto", x.device.type) and x.dim() >= 2
                and _library.has_kernel("int8_linear_from_float", x.device.type)
                and not (w_bits <= 4 and x.is_cuda))

    @staticmethod
    def _int4_route(x_q: Tensor, w_bits: int, weight: Tensor, backend: str) -> bool:
        return (w_bits <= 4 and x_q.is_cuda and weight.shape[1] % 2 == 0 and backend in ("auto", "cuda")
                and _library.has_kernel("w4a8_linear", "cuda"))

    def _fused_arguments(self, tokens: int, weight, weight_scale, a_bits, input_scale, input_zero_point,
                         smooth_scale, bias) -> tuple:
        key = (tokens, a_bits, *_key(input_scale, input_zero_point, weight, weight_scale, bias, smooth_scale))
        if self._fused is None or self._fused[0] != key:
            scale, zp, w_scale, b = native_epilogue_args(weight.shape[0], input_scale.expand(tokens),
                                                         input_zero_point.expand(tokens), weight_scale, bias,
                                                         None, None)[:4]
            smooth = None if smooth_scale is None else smooth_scale.float()
            self._fused = (key, (smooth, scale, zp, a_bits, weight, w_scale, b))
        return self._fused[1]

    def _packed_int4(self, weight: Tensor) -> Tensor:
        key = _key(weight)
        if self._int4 is None or self._int4[0] != key:
            self._int4 = (key, pack_int4(weight))
        return self._int4[1]

    def _row_sums(self, weight: Tensor) -> Tensor:
        """The weight's exact int32 row sums (N,), on its device (the same for its 4-bit packing)."""
        key = _key(weight)
        if self._w_sum is None or self._w_sum[0] != key:
            self._w_sum = (key, weight.sum(1, dtype=torch.int32))
        return self._w_sum[1]


__all__ = ["IntLinearKernels"]

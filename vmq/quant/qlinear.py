"""Quantized linear layers: a learnable fake-quant layer, and the frozen integer layer it becomes.

    y = Qa(x / s) @ Qw(W * s)^T + b

``s`` is the per-input-channel smoothing scale (kept as ``log s`` so that learning keeps it
positive; off means s = 1).

* :class:`QuantLinear` (calibration and JLSS): fake quantization with straight-through rounding;
  smoothing, weight step sizes and activation step sizes are learnable.
* :class:`QuantizedLinear` (after :meth:`QuantLinear.freeze`, and what a packed file loads
  into): int8 weights and integer activations multiplied by :func:`vmq.ops.linear.int8_linear`
  (exact int32 accumulation, then the scales; the compiled kernel or its twin ``int8_linear_ref``,
  bit-identical, chosen by the layer's ``backend``). Its smoothing scale may be folded into the
  preceding operation (then ``smooth_scale`` is None).

The two agree to fp32 rounding; a test holds them together.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.linear import native_epilogue_args, int8_linear, pack_int4, w4a8_linear
from vmq.ops.quantize import quantize_per_token
from vmq.quant.quantizers import ActQuantizer, Granularity, WeightQuantizer, WeightStrategy, range_to_qparams


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: Optional[int], granularity: Granularity = "token_static",
                 num_tokens: Optional[int] = None, w_strategy: WeightStrategy = "channel"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        self.log_smooth = nn.Parameter(torch.zeros(self.in_features), requires_grad=False)
        self.smoothing = False
        self.w_quant = WeightQuantizer(self.out_features, w_bits, w_strategy)
        self.a_quant = ActQuantizer(a_bits, granularity, num_tokens) if a_bits else None
        self.quant_enabled = True  # off while observing inputs: the layer then computes in floating point

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits

    @property
    def a_bits(self) -> Optional[int]:
        return self.a_quant.bits if self.a_quant is not None else None

    @property
    def smooth(self) -> Tensor:
        return torch.exp(self.log_smooth)

    def set_smoothing(self, scale: Tensor) -> None:
        with torch.no_grad():
            self.log_smooth.copy_(torch.log(scale.float()))
        self.smoothing = True

    def smoothed_weight(self) -> Tensor:
        return self.weight * self.smooth[None, :] if self.smoothing else self.weight

    def smoothed_input(self, x: Tensor) -> Tensor:
        return x / self.smooth if self.smoothing else x

    def forward(self, x: Tensor) -> Tensor:
        if not self.quant_enabled:
            return self.float_forward(x)
        xs = self.smoothed_input(x)
        if self.a_quant is not None:
            xs = self.a_quant(xs)
        return F.linear(xs, self.w_quant(self.smoothed_weight()), self.bias)

    def float_forward(self, x: Tensor) -> Tensor:
        """The unquantized layer's output (smoothing cancels out)."""
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def freeze(self) -> "QuantizedLinear":
        """The integer layer with this layer's current weights, step sizes and smoothing."""
        a = self.a_quant
        static = a is not None and a.granularity != "token_dynamic"
        return QuantizedLinear(
            weight_int=self.w_quant.integer(self.smoothed_weight()),
            weight_scale=self.w_quant.flat_scale,
            w_bits=self.w_bits,
            w_strategy=self.w_quant.strategy,
            a_bits=self.a_bits,
            a_strategy=a.granularity if a is not None else None,
            input_scale=a.scale.detach()[:, 0].clone() if static else None,
            input_zero_point=a.zero_point[:, 0].to(torch.int32) if static else None,
            smooth_scale=self.smooth.detach().clone() if self.smoothing else None,
            bias=None if self.bias is None else self.bias.detach().clone(),
        )

    def extra_repr(self) -> str:
        a = f"a{self.a_bits} {self.a_quant.granularity}" if self.a_quant is not None else "a16"
        return (f"{self.in_features}, {self.out_features}, w{self.w_bits} per-{self.w_quant.strategy}, {a}, "
                f"smoothing={self.smoothing}")


class QuantizedLinear(nn.Module):
    """Integer linear layer (inference only). Tensors are buffers named as in the packed file."""

    def __init__(self, weight_int: Tensor, weight_scale: Tensor, w_bits: int, w_strategy: WeightStrategy,
                 a_bits: Optional[int], a_strategy: Optional[Granularity], input_scale: Optional[Tensor] = None,
                 input_zero_point: Optional[Tensor] = None, smooth_scale: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None):
        super().__init__()
        if weight_int.dtype != torch.int8 or weight_int.dim() != 2:
            raise ValueError(f"weight_int must be a 2-D int8 tensor, got {weight_int.dtype} {tuple(weight_int.shape)}")
        self.out_features, self.in_features = weight_int.shape
        if w_strategy not in ("channel", "tensor"):
            raise ValueError(f"unknown weight strategy {w_strategy!r}")
        if a_strategy not in (None, "token_static", "tensor_static", "token_dynamic"):
            raise ValueError(f"unknown activation strategy {a_strategy!r}")
        if a_bits is not None and not 2 <= a_bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {a_bits}")
        if not 2 <= w_bits <= 8:
            raise ValueError(f"weight bits must be 2..8, got {w_bits}")
        expected = (self.out_features,) if w_strategy == "channel" else (1,)
        if tuple(weight_scale.shape) != expected:
            raise ValueError(f"per-{w_strategy} weight_scale must be {expected}, got {tuple(weight_scale.shape)}")
        if (a_bits is None) != (a_strategy is None):
            raise ValueError("a_bits and a_strategy go together")
        static = a_strategy in ("token_static", "tensor_static")
        if static and (input_scale is None or input_zero_point is None):
            raise ValueError(f"{a_strategy} activations need input_scale and input_zero_point")
        if static and (input_scale.dim() != 1 or input_zero_point.shape != input_scale.shape
                       or (a_strategy == "tensor_static" and input_scale.numel() != 1)):
            raise ValueError(f"bad input_scale / input_zero_point shapes {tuple(input_scale.shape)} / "
                             f"{tuple(input_zero_point.shape)} for {a_strategy}")
        for what, t, n in (("smooth_scale", smooth_scale, self.in_features), ("bias", bias, self.out_features)):
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"{what} must be ({n},), got {tuple(t.shape)}")
        self.w_bits, self.w_strategy, self.a_bits, self.a_strategy = w_bits, w_strategy, a_bits, a_strategy
        self.register_buffer("weight", weight_int)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", input_scale.float() if static else None)
        self.register_buffer("input_zero_point", input_zero_point.to(torch.int32) if static else None)
        self.register_buffer("smooth_scale", None if smooth_scale is None else smooth_scale.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.backend = "auto"  # kernel choice (vmq.ops.backend)

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        smooth = self.smooth_scale
        if self.a_bits is None:
            return F.linear(x if smooth is None else x / smooth, self.dequantized_weight(), self.bias)
        tokens = x.shape[-2]
        if self.a_strategy == "token_dynamic":
            if smooth is not None:
                x = x / smooth
            scale, zp = range_to_qparams(x.amin(-1), x.amax(-1), self.a_bits)
        else:
            if self.a_strategy == "token_static" and self.input_scale.numel() != tokens:
                raise VmqError(f"per-token static scales were calibrated for {self.input_scale.numel()} tokens, "
                                 f"the input has {tokens}")
            if self._use_fused_input(x):  # smoothing and quantization as rows enter the GEMM
                return torch.ops.vmq.int8_linear_from_float(x, *self._fused_arguments(tokens))
            scale, zp = self.input_scale.expand(tokens), self.input_zero_point.expand(tokens)
            if smooth is not None:
                x = x / smooth
        x_q = quantize_per_token(x, scale, zp, self.a_bits, backend=self.backend)
        if self._use_int4_kernel(x_q):
            return w4a8_linear(x_q, scale, zp, self._packed_int4(), self.weight_scale, self.bias, backend=self.backend)
        return int8_linear(x_q, scale, zp, self.weight, self.weight_scale, self.bias, backend=self.backend)

    def _fused_arguments(self, tokens: int) -> tuple:
        """The arguments of ``vmq::int8_linear_from_float`` after ``x``, in the kernel's dtypes (what
        :func:`vmq.ops.linear.int8_linear_from_float` would pass). Cached while the buffers are the
        same tensors at the same versions: at batch 1 the per-call preparation costs as much as
        the kernel."""
        buffers = (self.input_scale, self.input_zero_point, self.weight, self.weight_scale, self.bias,
                   self.smooth_scale)
        key = (tokens, *((id(t), t._version) for t in buffers if t is not None))
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] != key:
            scale, zp, w_scale, bias = native_epilogue_args(
                self.out_features, self.input_scale.expand(tokens), self.input_zero_point.expand(tokens),
                self.weight_scale, self.bias, None, None)[:4]
            smooth = None if self.smooth_scale is None else self.smooth_scale.float()
            cached = self.__dict__["_fused_cache"] = (key, (smooth, scale, zp, self.a_bits, self.weight, w_scale, bias))
        return cached[1]

    def _use_fused_input(self, x: Tensor) -> bool:
        """Whether the fused float-input kernel runs this layer (static scales; where it is built)."""
        return (self.backend in ("auto", x.device.type) and x.dim() >= 2
                and _library.has_kernel("int8_linear_from_float", x.device.type)
                and not (self.w_bits <= 4 and x.is_cuda))  # 4-bit weights on CUDA: the W4A8 kernel

    def _use_int4_kernel(self, x_q: Tensor) -> bool:
        """4-bit weights on CUDA go to the W4A8 kernel (unpacked in the kernel; half the weight traffic)."""
        return (self.w_bits <= 4 and x_q.is_cuda and self.in_features % 2 == 0 and self.backend in ("auto", "cuda")
                and _library.has_kernel("w4a8_linear", "cuda"))

    def _packed_int4(self) -> Tensor:
        """The weights packed two per byte, cached while the weight tensor stays the same."""
        key = (self.weight.data_ptr(), self.weight.device, self.weight._version)
        if getattr(self, "_int4_cache", (None,))[0] != key:
            self._int4_cache = (key, pack_int4(self.weight))
        return self._int4_cache[1]

    def extra_repr(self) -> str:
        a = f"a{self.a_bits} {self.a_strategy}" if self.a_bits else "a16"
        return (f"{self.in_features}, {self.out_features}, w{self.w_bits} per-{self.w_strategy}, {a}, "
                f"smoothing={'explicit' if self.smooth_scale is not None else 'none/folded'}")

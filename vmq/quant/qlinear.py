"""A linear layer with quantized input and weight, smoothing scale included.

    y = Qa(x / s) @ Qw(W * s)^T + b

``s`` is the per-input-channel smoothing scale (ones when smoothing is off). Two modes:

* ``fake`` (calibration and JLSS): fake quantization with straight-through rounding, every
  scale learnable;
* ``integer`` (after freezing): activations quantized to uint8 and multiplied with the stored
  int8 weights through :func:`vmq.ops.linear.int8_linear_ref` (int32 accumulation, then scales).

The two agree to fp32 rounding; a test holds them together.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vmq.ops.linear import int8_linear_ref
from vmq.ops.quantize import quantize_per_token_ref
from vmq.quant.quantizers import ActQuantizer, Granularity, WeightQuantizer


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: Optional[int], granularity: Granularity,
                 num_tokens: Optional[int], smoothing: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.smooth = nn.Parameter(torch.ones(self.in_features), requires_grad=smoothing)
        self.smoothing = smoothing
        self.w_quant = WeightQuantizer(self.out_features, w_bits)
        self.a_quant = ActQuantizer(a_bits, granularity, num_tokens) if a_bits else None
        self.mode = "fake"
        self.register_buffer("weight_int", torch.empty(0, dtype=torch.int8), persistent=False)

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits

    @property
    def a_bits(self) -> Optional[int]:
        return self.a_quant.bits if self.a_quant is not None else None

    def smoothed_weight(self) -> Tensor:
        return self.weight * self.smooth[None, :]

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "integer":
            return self._forward_integer(x)
        xs = x / self.smooth if self.smoothing else x
        if self.a_quant is not None:
            xs = self.a_quant(xs)
        w = self.w_quant(self.smoothed_weight())
        return nn.functional.linear(xs, w, self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the stored int8 weights and switch to integer arithmetic."""
        if self.a_quant is None or self.a_quant.granularity != "per_token_static" or self.a_bits > 8:
            raise ValueError("integer mode needs a per-token static activation quantizer of at most 8 bits")
        self.weight_int = self.w_quant.integer(self.smoothed_weight())
        self.mode = "integer"

    def _forward_integer(self, x: Tensor) -> Tensor:
        xs = x / self.smooth if self.smoothing else x
        scale, zp = self.a_quant.scale.detach()[:, 0], self.a_quant.zero_point[:, 0]
        x_q = quantize_per_token_ref(xs, scale, zp, self.a_bits)
        return int8_linear_ref(x_q, scale, zp, self.weight_int, self.w_quant.scale.detach()[:, 0], self.bias)

    def extra_repr(self) -> str:
        a = f"a{self.a_bits} {self.a_quant.granularity}" if self.a_quant is not None else "a16"
        return f"{self.in_features}, {self.out_features}, w{self.w_bits} per-channel, {a}, smoothing={self.smoothing}, mode={self.mode}"

"""The learnable fake-quant linear layer of PTQ, and its freezing into the integer runtime layer.

    y = Qa(x / s) @ Qw(W * s)^T + b

``s`` is the per-input-channel smoothing scale (kept as ``log s`` so that learning keeps it
positive; off means s = 1).

* :class:`QuantLinear` (calibration and JLSS): fake quantization with straight-through rounding;
  smoothing, weight step sizes and activation step sizes are learnable.
* :meth:`QuantLinear.freeze` gives the runtime layer :class:`vmq.layers.QuantizedLinear`: int8
  weights and integer activations (exact int32 accumulation, then the scales). Its smoothing
  scale may later be folded into the preceding operation (then ``smooth_scale`` is None).

The two agree to fp32 rounding; a test holds them together.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.layers import QuantizedLinear
from vmq.quant.quantizers import ActQuantizer, Granularity, WeightQuantizer, WeightStrategy


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: Optional[int], granularity: Granularity = "token_static",
                 tokens: Optional[int] = None, w_strategy: WeightStrategy = "channel"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        device = linear.weight.device  # every tensor of the layer lives where its weight does
        self.log_smooth = nn.Parameter(torch.zeros(self.in_features, device=device), requires_grad=False)
        self.smoothing = False
        self.w_quant = WeightQuantizer(self.out_features, w_bits, w_strategy, device=device)
        self.a_quant = ActQuantizer(a_bits, granularity, tokens, device=device) if a_bits else None
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


__all__ = ["QuantLinear"]

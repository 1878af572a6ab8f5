"""Uniform quantizers used while calibrating and learning (fake quantization with straight-through rounding).

Integer ranges (bits, never levels):

* weights: symmetric, per output channel (or per tensor), integers in
  [-(2^(b-1) - 1), 2^(b-1) - 1];
* activations: asymmetric unsigned, integers in [0, 2^b - 1] with an integer zero point, one
  (scale, zero point) per token position (``token_static``, PTS), per tensor
  (``tensor_static``), or computed per token at run time (``token_dynamic``).

Rounding is ``torch.round`` (half to even) everywhere; :mod:`vmq.ops.quantize` fixes the same
arithmetic for the integer path.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.ops.quantize import range_to_qparams

Granularity = Literal["token_static", "tensor_static", "token_dynamic"]
WeightStrategy = Literal["channel", "tensor"]


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def act_qmax(bits: int) -> int:
    return 2 ** bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Value of ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def fake_quant(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` with straight-through rounding.

    Gradients reach ``x`` inside the range and ``scale`` everywhere (the LSQ gradient).
    """
    zp = 0.0 if zero_point is None else zero_point
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer with a learnable step size per output channel (or one per tensor)."""

    def __init__(self, out_features: int, bits: int, strategy: WeightStrategy = "channel",
                 device: Optional[torch.device] = None):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be 2..8, got {bits}")
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"weight strategy must be channel or tensor, got {strategy!r}")
        self.bits, self.strategy = bits, strategy
        self.scale = nn.Parameter(torch.ones(out_features if strategy == "channel" else 1, 1, device=device))

    @property
    def qmax(self) -> int:
        return weight_qmax(self.bits)

    def forward(self, w: Tensor) -> Tensor:
        per_step = w.shape[1] if self.strategy == "channel" else w.numel()
        s = grad_scale(self.scale, 1.0 / math.sqrt(per_step * self.qmax)) if self.training else self.scale
        return fake_quant(w, s, None, -self.qmax, self.qmax)

    @torch.no_grad()
    def integer(self, w: Tensor) -> Tensor:
        """The stored integers (int8) of ``w``."""
        return torch.clamp(torch.round(w / self.scale), -self.qmax, self.qmax).to(torch.int8)

    @property
    def flat_scale(self) -> Tensor:
        """The step sizes as a 1-D tensor: (out_features,) or (1,)."""
        return self.scale.detach()[:, 0].clone()


class ActQuantizer(nn.Module):
    """Asymmetric activation quantizer over (batch, tokens, channels) inputs.

    ``token_static``: one learnable scale and a fixed integer zero point per token position.
    ``tensor_static``: one of each. ``token_dynamic``: min/max of each token at run time.
    """

    def __init__(self, bits: int, granularity: Granularity, tokens: Optional[int] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {bits}")
        if granularity not in ("token_static", "tensor_static", "token_dynamic"):
            raise ValueError(f"unknown activation granularity {granularity!r}")
        if granularity == "token_static" and not tokens:
            raise ValueError("token_static needs the number of token positions")
        self.bits, self.granularity = bits, granularity
        n = tokens if granularity == "token_static" else 1
        self.tokens = tokens
        if granularity != "token_dynamic":
            self.scale = nn.Parameter(torch.ones(n, 1, device=device))
            self.register_buffer("zero_point", torch.zeros(n, 1, device=device))

    @property
    def qmax(self) -> int:
        return act_qmax(self.bits)

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set scale and zero point from a (clipped) range; ``lo``/``hi`` are (n,) or scalars."""
        scale, zp = range_to_qparams(lo, hi, self.bits)
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zp.reshape(self.zero_point.shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.granularity == "token_dynamic":
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            scale, zp = range_to_qparams(lo, hi, self.bits)
            return fake_quant(x, scale, zp, 0, self.qmax)
        if self.granularity == "token_static" and x.shape[-2] != self.tokens:
            raise VmqError(f"per-token static quantizer calibrated for {self.tokens} tokens got {x.shape[-2]}")
        per_step = x[..., 0, :].numel() if self.granularity == "token_static" else x.numel()
        s = grad_scale(self.scale, 1.0 / math.sqrt(per_step * self.qmax)) if self.training else self.scale
        return fake_quant(x, s, self.zero_point, 0, self.qmax)

"""The integer linear layer: int8-stored weights (2 to 8 bits) and integer activations.

What ``vmq quantize`` freezes its fake-quant layers into and what a packed file of kind ``int``
loads into. The arithmetic is :func:`vmq.ops.linear.int8_linear_ref` on the per-token quantized
input (exact int32 accumulation, then the scales); the kernel for it is chosen in
:class:`vmq.ops.int_linear.IntLinearKernels`.

Packed tensors (compressed-tensors names, relative to the layer):

==========================  ======================================================================
``weight``                  int8 (N, K), 8-bit weights
``weight_packed``           uint8, 2..7-bit weights bit-packed row-major (:mod:`vmq.pack.bits`)
``weight_scale``            fp32 (N,) per channel or (1,) per tensor
``input_scale``             fp32 (T,) per token position or (1,) per tensor (static activations)
``input_zero_point``        int32, shaped as ``input_scale``
``smooth_scale``            fp32 (K,), only where smoothing was not folded into the previous op
``bias``                    fp32 (N,), when the layer has one
==========================  ======================================================================
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from vmq.layers.base import RuntimeLayer
from vmq.ops.int_linear import IntLinearKernels
from vmq.pack.bits import pack_signed, packed_nbytes, unpack_signed

WEIGHT_STRATEGIES = ("channel", "tensor")
ACT_STRATEGIES = ("token_static", "tensor_static", "token_dynamic")


class QuantizedLinear(RuntimeLayer):
    """Integer linear layer (inference only). Tensors are buffers named as in the packed file."""

    kind = "int"

    def __init__(self, weight_int: Tensor, weight_scale: Tensor, w_bits: int, w_strategy: str,
                 a_bits: Optional[int], a_strategy: Optional[str], input_scale: Optional[Tensor] = None,
                 input_zero_point: Optional[Tensor] = None, smooth_scale: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None):
        super().__init__()
        if weight_int.dtype != torch.int8 or weight_int.dim() != 2:
            raise ValueError(f"weight_int must be a 2-D int8 tensor, got {weight_int.dtype} {tuple(weight_int.shape)}")
        self.out_features, self.in_features = weight_int.shape
        if w_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(f"unknown weight strategy {w_strategy!r}")
        if a_strategy not in (None, *ACT_STRATEGIES):
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
        self.kernels = IntLinearKernels()

    def forward(self, x: Tensor) -> Tensor:
        return self.kernels(x, self.weight, self.weight_scale, self.w_bits, self.a_bits, self.a_strategy,
                            self.input_scale, self.input_zero_point, self.smooth_scale, self.bias)

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    # -- the format -----------------------------------------------------------------------
    def spec(self) -> dict:
        return {"w_bits": self.w_bits, "w_strategy": self.w_strategy, "a_bits": self.a_bits,
                "a_strategy": self.a_strategy}

    def packed_tensors(self) -> Dict[str, Tensor]:
        out = {"weight": self.weight} if self.w_bits == 8 else {"weight_packed": pack_signed(self.weight, self.w_bits)}
        return {**out, **self.present("weight_scale", "input_scale", "input_zero_point", "smooth_scale", "bias")}

    @classmethod
    def from_packed(cls, spec: dict, tensors: Dict[str, Tensor], shape: Tuple[int, int]) -> "QuantizedLinear":
        bits = spec["w_bits"]
        if bits == 8:
            w = tensors.pop("weight")
        else:
            packed = tensors.pop("weight_packed")
            numel = shape[0] * shape[1]
            if packed.numel() != packed_nbytes(numel, bits):
                raise ValueError(f"weight_packed has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)}")
            w = unpack_signed(packed, bits, numel).reshape(shape)
        return cls(w, tensors.pop("weight_scale"), bits, spec["w_strategy"], spec["a_bits"], spec["a_strategy"],
                   tensors.pop("input_scale", None), tensors.pop("input_zero_point", None),
                   tensors.pop("smooth_scale", None), tensors.pop("bias", None))

    def float_weight(self) -> Tensor:
        w = self.dequantized_weight()
        return w if self.smooth_scale is None else w / self.smooth_scale[None, :]

    def absorb_output_scale(self, rows: Tuple[int, int], scale: Tensor) -> bool:
        """Per-channel step sizes absorb an output scale exactly: the stored integers do not change."""
        if self.w_strategy != "channel":
            return False
        self.weight_scale[rows[0]:rows[1]] /= scale
        return True

    def extra_repr(self) -> str:
        a = f"a{self.a_bits} {self.a_strategy}" if self.a_bits else "a16"
        return (f"{self.in_features}, {self.out_features}, w{self.w_bits} per-{self.w_strategy}, {a}, "
                f"smoothing={'explicit' if self.smooth_scale is not None else 'none/folded'}")


__all__ = ["QuantizedLinear"]

"""The frozen VQ linear layer: codes, fp16 codebooks, optional fp16 row scales and static activations.

What ``vmq vq`` produces and a packed file loads into. The product is
:func:`vmq.ops.linear.vq_linear` (the ``vmq::vq_linear`` kernel, which decodes the weight from
its codes, or its twin ``vq_linear_ref``), chosen by the layer's ``backend``; with quantized
activations the input first goes through :func:`vmq.ops.quantize.quantize_per_token` and back
(the weights are not integers, so the product runs on the dequantized activations).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.ops.linear import vq_dequantize_ref, vq_linear
from vmq.ops.quantize import dequantize_per_token_ref, quantize_per_token


class VQLinear(nn.Module):
    def __init__(self, codes: Tensor, codebook: Tensor, in_features: int, rows_per_group: Optional[int] = None,
                 weight_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 a_bits: Optional[int] = None, a_strategy: Optional[str] = None,
                 input_scale: Optional[Tensor] = None, input_zero_point: Optional[Tensor] = None):
        super().__init__()
        if codes.dim() != 2 or codebook.dim() != 3:
            raise ValueError(f"expected codes (N, cols) and codebook (G, K, d), got {tuple(codes.shape)} and "
                             f"{tuple(codebook.shape)}")
        self.out_features, cols = codes.shape
        groups, size, dim = codebook.shape
        self.in_features, self.dim, self.size = int(in_features), dim, size
        self.rows_per_group = int(rows_per_group or self.out_features)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise ValueError(f"codes must index the {size} codewords")
        if weight_scale is not None and tuple(weight_scale.shape) != (self.out_features,):
            raise ValueError(f"weight_scale must be ({self.out_features},), got {tuple(weight_scale.shape)}")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be ({self.out_features},), got {tuple(bias.shape)}")
        if (a_bits is None) != (a_strategy is None):
            raise ValueError("a_bits and a_strategy go together")
        if a_strategy not in (None, "token_static", "tensor_static"):
            raise ValueError(f"VQ layers take static activations only, not {a_strategy!r}")
        if a_bits is not None and (input_scale is None or input_zero_point is None or input_scale.dim() != 1
                                   or input_zero_point.shape != input_scale.shape):
            raise ValueError(f"{a_strategy} activations need 1-D input_scale and input_zero_point of one shape")
        self.a_bits, self.a_strategy = a_bits, a_strategy
        self.register_buffer("weight_codes", codes.to(torch.int32))
        self.register_buffer("weight_codebook", codebook.half())
        self.register_buffer("weight_scale", None if weight_scale is None else weight_scale.half())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("input_scale", None if a_bits is None else input_scale.float())
        self.register_buffer("input_zero_point", None if a_bits is None else input_zero_point.to(torch.int32))
        self.backend = "auto"  # kernel choice (vmq.ops.backend)
        if (cols - 1) * dim >= self.in_features or cols * dim < self.in_features:
            raise ValueError(f"{cols} codes of dim {dim} per row do not cover {self.in_features} inputs")
        if -(-self.out_features // self.rows_per_group) != groups:
            raise ValueError(f"{self.out_features} rows in groups of {self.rows_per_group} need "
                             f"{-(-self.out_features // self.rows_per_group)} codebooks, got {groups}")

    @property
    def code_bits(self) -> int:
        return self.size.bit_length() - 1

    def dequantized_weight(self) -> Tensor:
        return vq_dequantize_ref(self.weight_codes, self.weight_codebook, self.in_features, self.rows_per_group,
                                 self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.a_bits is not None:
            tokens = x.shape[-2]
            if self.a_strategy == "token_static" and self.input_scale.numel() != tokens:
                raise VmqError(f"per-token static scales were calibrated for {self.input_scale.numel()} tokens, "
                               f"the input has {tokens}")
            scale, zp = self.input_scale.expand(tokens), self.input_zero_point.expand(tokens)
            x = dequantize_per_token_ref(quantize_per_token(x, scale, zp, self.a_bits, backend=self.backend), scale, zp)
        return vq_linear(x, self.weight_codes, self.weight_codebook, self.rows_per_group, self.weight_scale,
                         self.bias, backend=self.backend)

    def storage_bits(self) -> dict:
        """Bits of codes, codebooks and scales, and the layer's weight count."""
        return {
            "weights": self.out_features * self.in_features,
            "codes": self.weight_codes.numel() * self.code_bits,
            "codebook": self.weight_codebook.numel() * 16,
            "scale": 0 if self.weight_scale is None else self.weight_scale.numel() * 16,
        }

    def extra_repr(self) -> str:
        a = f"a{self.a_bits} {self.a_strategy}" if self.a_bits else "a16"
        return (f"{self.in_features}, {self.out_features}, d={self.dim} K={self.size} "
                f"groups={self.weight_codebook.shape[0]}, row_scale={self.weight_scale is not None}, {a}")


__all__ = ["VQLinear"]

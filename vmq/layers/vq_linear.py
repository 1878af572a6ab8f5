"""The vector-quantized linear layer: codes, fp16 codebooks, optional fp16 row scales and static activations.

What ``vmq vq`` freezes its layers into and what a packed file of kind ``vq`` loads into. The
product is :func:`vmq.ops.linear.vq_linear_ref` on the decoded weight; the kernel for it is
chosen in :func:`vmq.ops.vq_kernels.vq_layer_forward`.

Packed tensors (relative to the layer):

==========================  ======================================================================
``weight_codes``            uint8, the (N, ceil(K_in / d)) codebook indices bit-packed row-major,
                            log2(size) bits each (:func:`vmq.pack.bits.pack_unsigned`)
``weight_codebook``         fp16 (G, size, d), one codebook per group of output rows
``weight_scale``            fp16 (N,), per-row scale, when the recipe asked for one
``input_scale``, ``input_zero_point``, ``bias``: as for the integer layer
==========================  ======================================================================
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from vmq.layers.base import RuntimeLayer
from vmq.ops.linear import vq_dequantize_ref
from vmq.ops.vq_kernels import vq_layer_forward
from vmq.pack.bits import pack_unsigned, packed_nbytes, unpack_unsigned


class VQLinear(RuntimeLayer):
    kind = "vq"

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
        # checked once here (a packed file's codes, log2(size) bits each, always index the codebook):
        # the CUDA kernel trusts them, as a check per call would synchronise with the host
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
        return vq_layer_forward(x, self.weight_codes, self.weight_codebook, self.rows_per_group, self.weight_scale,
                                self.bias, self.a_bits, self.a_strategy, self.input_scale, self.input_zero_point)

    # -- the format -----------------------------------------------------------------------
    def spec(self) -> dict:
        return {"dim": self.dim, "size": self.size, "rows_per_group": self.rows_per_group,
                "row_scale": self.weight_scale is not None, "a_bits": self.a_bits, "a_strategy": self.a_strategy}

    def packed_tensors(self) -> Dict[str, Tensor]:
        return {"weight_codes": pack_unsigned(self.weight_codes, self.code_bits),
                **self.present("weight_codebook", "weight_scale", "input_scale", "input_zero_point", "bias")}

    @classmethod
    def from_packed(cls, spec: dict, tensors: Dict[str, Tensor], shape: Tuple[int, int]) -> "VQLinear":
        size, dim = int(spec["size"]), int(spec["dim"])
        if size < 2 or size & (size - 1) or dim < 1:
            raise ValueError(f"impossible codebook (size {size}, dim {dim})")
        bits = size.bit_length() - 1
        cols = -(-shape[1] // dim)
        numel = shape[0] * cols
        packed = tensors.pop("weight_codes")
        if packed.numel() != packed_nbytes(numel, bits):
            raise ValueError(f"weight_codes has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)}")
        codes = unpack_unsigned(packed, bits, numel).reshape(shape[0], cols)
        codebook = tensors.pop("weight_codebook")
        if codebook.dim() != 3 or tuple(codebook.shape[1:]) != (size, dim):
            raise ValueError(f"weight_codebook is {tuple(codebook.shape)}, expected (G, {size}, {dim})")
        scale = tensors.pop("weight_scale") if spec.get("row_scale") else None
        return cls(codes, codebook, shape[1], spec["rows_per_group"], scale, tensors.pop("bias", None),
                   spec["a_bits"], spec["a_strategy"], tensors.pop("input_scale", None),
                   tensors.pop("input_zero_point", None))

    def float_weight(self) -> Tensor:
        return self.dequantized_weight()

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

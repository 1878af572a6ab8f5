"""Kernel choice for the vector-quantized linear layer (:class:`vmq.layers.VQLinear`).

The weight stays in its codes and fp16 codebooks and ``vq_linear`` decodes it (the compiled
``vmq::vq_linear`` or its twin ``vq_linear_ref``). With static activation quantization the
input first goes through ``quantize_per_token`` and back: the weights are not integers, so the
product runs on the dequantized activations.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vmq.errors import VmqError
from vmq.ops.backend import resolve_backend
from vmq.ops.linear import vq_linear
from vmq.ops.quantize import dequantize_per_token_ref, quantize_per_token


def vq_layer_forward(x: Tensor, codes: Tensor, codebook: Tensor, rows_per_group: int, weight_scale: Optional[Tensor],
                     bias: Optional[Tensor], a_bits: Optional[int], a_strategy: Optional[str],
                     input_scale: Optional[Tensor], input_zero_point: Optional[Tensor],
                     backend: Optional[str] = None) -> Tensor:
    backend = resolve_backend(backend)
    x = x.float()
    if a_bits is not None:
        tokens = x.shape[-2]
        if a_strategy == "token_static" and input_scale.numel() != tokens:
            raise VmqError(f"per-token static scales were calibrated for {input_scale.numel()} tokens, "
                           f"the input has {tokens}")
        scale, zp = input_scale.expand(tokens), input_zero_point.expand(tokens)
        x = dequantize_per_token_ref(quantize_per_token(x, scale, zp, a_bits, backend=backend), scale, zp)
    return vq_linear(x, codes, codebook, rows_per_group, weight_scale, bias, backend=backend)


__all__ = ["vq_layer_forward"]

"""Every op's pure-PyTorch twin registered as its default implementation.

``torch.ops.vmq.<op>`` then runs on any device, whether ``vmq._C`` is built or not: the twin
is the op's CompositeExplicitAutograd kernel, and a compiled CPU / CUDA kernel registered by
``vmq._C`` takes precedence on its own device (``_library.has_kernel`` still reports compiled
kernels only). The two ops whose kernels return token-major storage viewed as
(batch, d_inner, seqlen) get the twin's values in that layout, as their fake implementations
declare. Imported last by :mod:`vmq.ops`, once the schemas and the twins exist.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from vmq.ops import _library
from vmq.ops.conv import bidirectional_conv1d_silu_ref
from vmq.ops.kmeans import kmeans_assign_ref, kmeans_update_ref
from vmq.ops.linear import int8_linear_from_float_ref, int8_linear_ref, vq_linear_ref, w4a8_linear_ref
from vmq.ops.norm import rms_norm_ref
from vmq.ops.quantize import quantize_per_token_ref
from vmq.ops.multi_scan import multi_scan_ref
from vmq.ops.scan import bidirectional_scan_ref
from vmq.ops.scan_train import scan_train_bwd_ref, scan_train_fwd_ref


def _token_major(t: Tensor) -> Tensor:
    """fp32 ``t`` (batch, d, seqlen) in (batch, seqlen, d) storage: the kernels' output layout."""
    return t.float().transpose(1, 2).contiguous().transpose(1, 2)


def _bidirectional_scan_default(*args) -> Tensor:
    return _token_major(bidirectional_scan_ref(*args))


def _multi_scan_default(*args) -> Tensor:
    out = multi_scan_ref(*args)
    if out.dim() == 4:  # merge "none": (batch, K, seqlen, d_inner) storage
        return out.transpose(2, 3).contiguous().transpose(2, 3)
    return _token_major(out)


def _bidirectional_conv1d_silu_default(x, weight, bias, weight_b, bias_b) -> Tuple[Tensor, Tensor]:
    u, u_b = bidirectional_conv1d_silu_ref(x, weight, bias, weight_b, bias_b)
    return _token_major(u), _token_major(u_b)


TWINS: Dict[str, Callable] = {
    "scan_train_fwd": scan_train_fwd_ref,
    "scan_train_bwd": scan_train_bwd_ref,
    "kmeans_assign": kmeans_assign_ref,
    "kmeans_update": kmeans_update_ref,
    "bidirectional_scan": bidirectional_scan_ref,
    "multi_scan": multi_scan_ref,
    "bidirectional_conv1d_silu": bidirectional_conv1d_silu_ref,
    "rms_norm": rms_norm_ref,
    "quantize_per_token": quantize_per_token_ref,
    "int8_linear": int8_linear_ref,
    "int8_linear_from_float": int8_linear_from_float_ref,
    "w4a8_linear": w4a8_linear_ref,
    "vq_linear": vq_linear_ref,
}
# what is registered, where it differs from the twin (layout only)
_REGISTERED = {**TWINS, "bidirectional_scan": _bidirectional_scan_default, "multi_scan": _multi_scan_default,
               "bidirectional_conv1d_silu": _bidirectional_conv1d_silu_default}

if set(TWINS) != set(_library.SCHEMAS):
    raise RuntimeError(f"vmq ops without a registered twin: {sorted(set(_library.SCHEMAS) ^ set(TWINS))}")

_LIB = torch.library.Library("vmq", "IMPL")
for _name, _fn in _REGISTERED.items():
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")

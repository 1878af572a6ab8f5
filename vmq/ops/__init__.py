"""Kernel entry points and the one place where kernels are chosen.

Each op ``vmq::<op>`` (schemas in :mod:`vmq.ops._library`) has a wrapper that picks the compiled
kernel or the pure-PyTorch twin ``<op>_ref`` (same arguments as the schema; it fixes the
arithmetic and is the op's default implementation). The choice: each wrapper's ``backend``
argument, else :func:`use_backend`'s scope, and :data:`CAPABILITIES` for which device has which
kernel (see :mod:`vmq.ops.backend`). One-direction scans for the models: :func:`one_direction_scan`,
:func:`training_scan`.
"""

from vmq.ops.backend import CAPABILITIES, current_backend, use_backend
from vmq.ops.conv import bidirectional_conv1d_silu, bidirectional_conv1d_silu_ref
from vmq.ops.kmeans import (assign, kmeans, kmeans_assign_ref, kmeans_update_ref, nearest_k, update_centroids)
from vmq.ops.linear import (int8_linear, int8_linear_from_float, int8_linear_from_float_ref, int8_linear_ref,
                            pack_int4, unpack_int4_ref, vq_linear, vq_linear_ref, w4a8_linear, w4a8_linear_ref)
from vmq.ops.norm import rms_norm, rms_norm_ref
from vmq.ops.quantize import quantize_per_token, quantize_per_token_ref
from vmq.ops.multi_scan import multi_direction_scan, multi_scan, multi_scan_ref
from vmq.ops.scan_ref import selective_scan_ref
from vmq.ops.scan_train import scan_train_bwd_ref, scan_train_fwd_ref, training_scan
from vmq.ops.scan import (bidirectional_scan, bidirectional_scan_ref, mamba_ssm_available, one_direction_scan,
                          two_direction_scan)
from vmq.ops import _defaults  # noqa: F401  (last: registers the twins as the ops' default kernels)

__all__ = [
    "CAPABILITIES", "current_backend", "use_backend",
    "bidirectional_scan", "multi_scan", "bidirectional_conv1d_silu", "rms_norm", "quantize_per_token", "int8_linear",
    "int8_linear_from_float", "w4a8_linear", "vq_linear", "assign", "update_centroids", "kmeans", "nearest_k",
    "pack_int4", "unpack_int4_ref",
    "bidirectional_scan_ref", "multi_scan_ref", "multi_direction_scan", "bidirectional_conv1d_silu_ref", "rms_norm_ref", "quantize_per_token_ref",
    "int8_linear_ref", "int8_linear_from_float_ref", "w4a8_linear_ref", "vq_linear_ref", "kmeans_assign_ref",
    "kmeans_update_ref", "scan_train_fwd_ref", "scan_train_bwd_ref",
    "selective_scan_ref", "two_direction_scan", "one_direction_scan", "training_scan",
    "mamba_ssm_available",
]

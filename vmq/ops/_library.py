"""The ``vmq`` operator library: every native kernel's schema and fake implementation, declared once.

The CPU and CUDA implementations register themselves from the compiled extension ``vmq._C``
(``TORCH_LIBRARY_IMPL(vmq, CPU | CUDA, m)`` in ``csrc/``); importing this module declares the
schemas first, then loads the extension when it is built. Where vmq._C has no CUDA kernels but
the machine has a GPU and CuPy, :mod:`vmq.ops.nvrtc` registers the CUDA kernels instead, built
from the same ``csrc/cuda`` sources by NVRTC at run time (:data:`CUDA_KERNELS` says which path
serves them; ``VMQ_CUDA_KERNELS`` chooses). Each op has a pure-PyTorch twin
``<op>_ref`` in :mod:`vmq.ops` with the schema's arguments, which defines its arithmetic and is
registered as the op's default (CompositeExplicitAutograd) implementation by
:mod:`vmq.ops._defaults`, so ``torch.ops.vmq.<op>`` runs on any device, built or not; a compiled
CPU / CUDA kernel takes precedence on its device. The fake implementations below give output
shapes, dtypes and strides only (for ``torch.compile`` and ``torch.library.opcheck``).
"""

from __future__ import annotations

import functools
import importlib
import torch

from vmq.ops import nvrtc

SCHEMAS = {
    # the trainable one-direction scan's core recurrence (vmq.ops.scan_train)
    "scan_train_fwd": "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C) -> Tensor",
    "scan_train_bwd": "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor grad_y) "
                      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    # k-means for VQ codebooks (vmq.ops.kmeans)
    "kmeans_assign": "(Tensor x, Tensor? w, Tensor centroids) -> (Tensor, Tensor)",
    "kmeans_update": "(Tensor x, Tensor? w, Tensor codes, Tensor centroids) -> Tensor",
    # both scan directions of a bidirectional (bimamba v2) Mamba layer in one call, optionally on int8 u / delta (vmq.ops.scan)
    "bidirectional_scan": "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
                          "Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor? D_b, "
                          "Tensor? z, Tensor? u_scale, Tensor? delta_scale, Tensor? u_b_scale, "
                          "Tensor? delta_b_scale, bool delta_softplus, bool divide_out) -> Tensor",
    # K scan directions, each through its own token order, in one call (vmq.ops.multi_scan)
    "multi_scan": "(Tensor[] u, Tensor[] delta, Tensor A, Tensor[] B, Tensor[] C, Tensor? D, Tensor? delta_bias, "
                  "Tensor? z, Tensor? in_index, Tensor out_index, Tensor? u_scale, Tensor? delta_scale, int seqlen, "
                  "bool delta_softplus, str merge) -> Tensor",
    # depthwise causal conv1d + SiLU of both directions of a bidirectional Mamba layer (vmq.ops.conv)
    "bidirectional_conv1d_silu": "(Tensor x, Tensor weight, Tensor? bias, Tensor weight_b, Tensor? bias_b) "
                                 "-> (Tensor, Tensor)",
    # RMSNorm in one pass (vmq.ops.norm)
    "rms_norm": "(Tensor x, Tensor weight, float eps) -> Tensor",
    # per-token activation quantization (vmq.ops.quantize)
    "quantize_per_token": "(Tensor x, Tensor scale, Tensor zero_point, int bits) -> Tensor",
    # integer linear layers (vmq.ops.linear)
    # (w_sum: the weight's int32 row sums, (out_features,), computed per call when None)
    "int8_linear": "(Tensor x_q, Tensor x_scale, Tensor x_zero_point, Tensor w_q, Tensor w_scale, Tensor? bias, "
                   "Tensor? out_scale, Tensor? out_zero_point, int out_bits, Tensor? w_sum=None) -> Tensor",
    # smoothing + per-token quantization of float activations + int8_linear in one pass (vmq.ops.linear)
    "int8_linear_from_float": "(Tensor x, Tensor? smooth_scale, Tensor x_scale, Tensor x_zero_point, int x_bits, "
                              "Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor",
    "w4a8_linear": "(Tensor x_q, Tensor x_scale, Tensor x_zero_point, Tensor w_packed, Tensor w_scale, Tensor? bias, "
                   "Tensor? out_scale, Tensor? out_zero_point, int out_bits, Tensor? w_sum=None) -> Tensor",
    "vq_linear": "(Tensor x, Tensor codes, Tensor codebook, int rows_per_group, Tensor? scale, Tensor? bias) -> Tensor",
}

_LIB = torch.library.Library("vmq", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake("vmq::scan_train_fwd")
def _(u, delta, A, B, C):
    return torch.empty_like(u)


@torch.library.register_fake("vmq::scan_train_bwd")
def _(u, delta, A, B, C, grad_y):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C))


@torch.library.register_fake("vmq::kmeans_assign")
def _(x, w, centroids):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n)


@torch.library.register_fake("vmq::kmeans_update")
def _(x, w, codes, centroids):
    return torch.empty_like(centroids, memory_format=torch.contiguous_format)


@torch.library.register_fake("vmq::bidirectional_scan")
def _(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, u_scale, delta_scale, u_b_scale,
      delta_b_scale, delta_softplus, divide_out):
    b, d, l = u.shape
    # token-major storage, (batch, d_inner, seqlen) view: what out_proj consumes next
    return u.new_empty(b, l, d, dtype=torch.float32).transpose(1, 2)


@torch.library.register_fake("vmq::multi_scan")
def _(u, delta, A, B, C, D, delta_bias, z, in_index, out_index, u_scale, delta_scale, seqlen, delta_softplus, merge):
    b, d = u[0].shape[:2]
    # token-major storage viewed as (batch, [K,] d_inner, seqlen): what out_proj consumes next
    if merge == "none":
        return u[0].new_empty(b, len(u), seqlen, d, dtype=torch.float32).transpose(2, 3)
    return u[0].new_empty(b, seqlen, d, dtype=torch.float32).transpose(1, 2)


@torch.library.register_fake("vmq::bidirectional_conv1d_silu")
def _(x, weight, bias, weight_b, bias_b):
    b, d, l = x.shape
    # token-major storage, (batch, d_inner, seqlen) views
    return (x.new_empty(b, l, d, dtype=torch.float32).transpose(1, 2),
            x.new_empty(b, l, d, dtype=torch.float32).transpose(1, 2))


@torch.library.register_fake("vmq::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("vmq::quantize_per_token")
def _(x, scale, zero_point, bits):
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.register_fake("vmq::int8_linear")
def _(x_q, x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum=None):
    shape = (*x_q.shape[:-1], w_q.shape[0])
    return x_q.new_empty(shape, dtype=torch.float32 if out_scale is None else torch.uint8)


@torch.library.register_fake("vmq::int8_linear_from_float")
def _(x, smooth_scale, x_scale, x_zero_point, x_bits, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("vmq::w4a8_linear")
def _(x_q, x_scale, x_zero_point, w_packed, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum=None):
    shape = (*x_q.shape[:-1], w_packed.shape[0])
    return x_q.new_empty(shape, dtype=torch.float32 if out_scale is None else torch.uint8)


@torch.library.register_fake("vmq::vq_linear")
def _(x, codes, codebook, rows_per_group, scale, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=torch.float32)


def _load_native():
    """Import ``vmq._C`` (registering its kernels): ``(module, None)`` or ``(None, why not)``."""
    try:
        return importlib.import_module("vmq._C"), None
    except ImportError as exc:
        if getattr(exc, "name", None) == "vmq._C":
            return None, "not built"
        return None, f"built but does not load ({exc})"


NATIVE, NATIVE_ERROR = _load_native()
# the path of the CUDA kernels: vmq._C's, NVRTC's (registered now, over vmq._C's if
# VMQ_CUDA_KERNELS=nvrtc) or none
CUDA_KERNELS = nvrtc.install(native_cuda=NATIVE is not None and bool(getattr(NATIVE, "cuda_built", False)))


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``vmq::<op>`` has a compiled kernel for ``device_type`` ("cpu" or "cuda"): vmq._C's,
    or for "cuda" the NVRTC build of the same source (:data:`CUDA_KERNELS`).

    Asks for a registration on that device's own dispatch key, which the default
    (CompositeExplicitAutograd) twin is not. Cached: the kernels are registered once, when
    this module is imported (every forward asks).
    """
    registered = CUDA_KERNELS.path != "none" if device_type == "cuda" else NATIVE is not None
    return registered and torch._C._dispatch_has_kernel_for_dispatch_key(f"vmq::{op}", device_type.upper())

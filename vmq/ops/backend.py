"""Kernel choice: ``auto | cuda | cpu | ref`` for every op in :mod:`vmq.ops`.

* ``ref``: the pure-PyTorch twin ``<op>_ref`` (defines the arithmetic; runs anywhere).
* ``cpu`` / ``cuda``: the compiled kernel of ``vmq._C`` for that device (for ``cuda``, or its
  NVRTC build through CuPy, :mod:`vmq.ops.nvrtc`), or a clear error
  (tensors on another device, extension not built, or an input the kernel does not take);
  for an op that by design has no kernel on that device (:data:`CAPABILITIES` says
  ``fallback``), the twin.
* ``auto``: the compiled kernel for the tensors' device when there is one that takes these
  inputs, else the twin.

Every op wrapper takes ``backend=None``, which means :func:`current_backend`: the innermost
``with use_backend(name):`` around the call (a :class:`contextvars.ContextVar`, so the choice is
scoped to the block, and to the thread or task that entered it), ``auto`` outside any. There is
no process-wide setting, and models carry no backend attribute.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional

from torch import Tensor

from vmq.errors import VmqError
from vmq.ops import _library, nvrtc

BACKENDS = ("auto", "cuda", "cpu", "ref")
BUILD_FIX = ("build it from the vmq source checkout with `pip install --no-build-isolation -e .` "
             "(or `make install`), with a C++ compiler (and nvcc for the CUDA kernels)")

# Per op and device: "kernel" (csrc/ has a compiled kernel for it) or "fallback" (by design none:
# the twin runs, also when the backend names that device). A test holds the "kernel" entries to
# what vmq._C registers.
CAPABILITIES: Dict[str, Dict[str, str]] = {
    "scan_train_fwd": {"cpu": "kernel", "cuda": "kernel"},
    "scan_train_bwd": {"cpu": "kernel", "cuda": "kernel"},
    "kmeans_assign": {"cpu": "kernel", "cuda": "kernel"},
    "kmeans_update": {"cpu": "kernel", "cuda": "fallback"},
    "bidirectional_scan": {"cpu": "kernel", "cuda": "kernel"},
    "multi_scan": {"cpu": "kernel", "cuda": "kernel"},
    "bidirectional_conv1d_silu": {"cpu": "kernel", "cuda": "fallback"},
    "rms_norm": {"cpu": "kernel", "cuda": "fallback"},
    "quantize_per_token": {"cpu": "kernel", "cuda": "kernel"},
    "int8_linear": {"cpu": "kernel", "cuda": "kernel"},
    "int8_linear_from_float": {"cpu": "kernel", "cuda": "fallback"},
    "w4a8_linear": {"cpu": "kernel", "cuda": "kernel"},
    "vq_linear": {"cpu": "kernel", "cuda": "kernel"},
}

_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("vmq_backend", default="auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def current_backend() -> str:
    """The backend of the innermost :func:`use_backend` block, ``auto`` outside any."""
    return _BACKEND.get()


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[str]:
    """Run the ops called inside the block (those given no ``backend``) on ``backend``; restored on exit."""
    token = _BACKEND.set(check_backend(backend))
    try:
        yield backend
    finally:
        _BACKEND.reset(token)


def resolve_backend(backend: Optional[str]) -> str:
    """``backend`` checked, or :func:`current_backend` when None."""
    return current_backend() if backend is None else check_backend(backend)


def native_status() -> str:
    """``built`` or why ``vmq._C`` is not available."""
    return "built" if _library.NATIVE is not None else _library.NATIVE_ERROR


def use_native(op: str, t: Tensor, backend: Optional[str], takes: bool = True, why: str = "") -> bool:
    """Whether to run the compiled ``vmq::<op>`` (True) or its reference twin (False).

    ``t`` is a representative input (its device picks the kernel); ``backend`` None means
    :func:`current_backend`; ``takes`` says whether the kernel accepts these inputs (dtype,
    shape), ``why`` what it needs when it does not.
    """
    backend = resolve_backend(backend)
    if backend == "ref":
        return False
    device = t.device.type
    if backend != "auto" and device != backend:
        raise VmqError(f"--backend {backend} asks for the {backend} kernel of {op}, but the tensors are on {device}")
    if backend != "auto" and CAPABILITIES[op].get(device) == "fallback":
        return False  # by design no kernel here: the twin
    available = _library.has_kernel(op, device)
    if backend == "auto":
        return available and takes
    if not available:
        # for cuda: or CuPy, which builds the same kernels without a toolkit (or why that path is off)
        hint = nvrtc.missing_hint(_library.CUDA_KERNELS) if backend == "cuda" else ""
        if _library.NATIVE is None:
            raise VmqError(f"the {backend} kernel of {op} needs the vmq._C extension, which is "
                           f"{native_status()}: {BUILD_FIX}{hint}")
        raise VmqError(f"vmq._C was built without a {backend} kernel for {op}"
                       + (f"; rebuild with a CUDA toolkit (nvcc) and a CUDA build of torch{hint}" if backend == "cuda"
                          else ""))
    if not takes:
        raise VmqError(f"the {backend} kernel of {op} {why}")
    return True



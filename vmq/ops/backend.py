"""Kernel choice: ``auto | cuda | cpu | ref`` for every op in :mod:`vmq.ops`.

* ``ref``: the pure-PyTorch twin (defines the arithmetic; runs anywhere).
* ``cpu`` / ``cuda``: the compiled kernel of ``vmq._C`` for that device, or a clear error
  (tensors on another device, extension not built, or an input the kernel does not take).
* ``auto``: the compiled kernel for the tensors' device when there is one that takes these
  inputs, else the twin.

Modules that call ops hold their own ``backend`` attribute; :func:`set_backend` sets it on every
such module of a model. There is no process-wide setting.
"""

from __future__ import annotations

from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.ops import _library

BACKENDS = ("auto", "cuda", "cpu", "ref")
BUILD_FIX = ("build it from the vmq source checkout with `pip install --no-build-isolation -e .` "
             "(or `make install`), with a C++ compiler (and nvcc for the CUDA kernels)")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def native_status() -> str:
    """``built`` or why ``vmq._C`` is not available."""
    return "built" if _library.NATIVE is not None else _library.NATIVE_ERROR


def use_native(op: str, t: Tensor, backend: str, takes: bool = True, why: str = "") -> bool:
    """Whether to run the compiled ``vmq::<op>`` (True) or its reference twin (False).

    ``t`` is a representative input (its device picks the kernel); ``takes`` says whether the
    kernel accepts these inputs (dtype, shape), ``why`` what it needs when it does not.
    """
    check_backend(backend)
    if backend == "ref":
        return False
    device = t.device.type
    if backend != "auto" and device != backend:
        raise VmqError(f"--backend {backend} asks for the {backend} kernel of {op}, but the tensors are on {device}")
    available = _library.has_kernel(op, device)
    if backend == "auto":
        return available and takes
    if not available:
        if _library.NATIVE is None:
            raise VmqError(f"the {backend} kernel of {op} needs the vmq._C extension, which is "
                           f"{native_status()}: {BUILD_FIX}")
        raise VmqError(f"vmq._C was built without a {backend} kernel for {op}"
                       + ("; rebuild with a CUDA toolkit (nvcc) and a CUDA build of torch" if backend == "cuda" else ""))
    if not takes:
        raise VmqError(f"the {backend} kernel of {op} {why}")
    return True


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every module of ``model`` that picks kernels (those with a ``backend`` attribute)."""
    check_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model

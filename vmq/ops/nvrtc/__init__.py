"""CUDA kernels without a compiler: ``csrc/cuda/*.cu`` built at run time by NVRTC, through CuPy.

Where ``vmq._C`` has no CUDA kernels (no toolkit when it was built, or a CPU-only build) but the
machine has a GPU and CuPy (``pip install cupy-cuda12x`` / ``cupy-cuda13x``, the CUDA major of
torch), :func:`install` registers Python implementations of the ops that have CUDA kernels
(:data:`IMPLS`: the CAPABILITIES "kernel" entries for cuda) for the ``CUDA`` dispatch key. Each
checks its inputs as the C++ binding does, allocates the same outputs and launches the same
kernels, compiled from the same sources on first use (per architecture, and loaded per device)
on torch's current stream. ``_library.has_kernel(op, "cuda")`` then reports them, and
``vmq env`` prints which path serves the CUDA kernels (``cuda_kernels``).

``VMQ_CUDA_KERNELS`` chooses the path, read once when :mod:`vmq.ops` is imported:

* ``auto`` (default): vmq._C's compiled CUDA kernels when it has them, else NVRTC when it can.
* ``native``: vmq._C's only; NVRTC is never tried.
* ``nvrtc``: NVRTC even when vmq._C has CUDA kernels: the Python registrations are made after
  vmq._C has loaded and override its CUDA kernels (the dispatcher keeps the compiled ones,
  inactive). Where NVRTC cannot serve (no GPU, no CuPy), vmq._C's kernels stay, and
  ``cuda_kernels`` says why. This runs the GPU tests on the NVRTC path:
  ``VMQ_CUDA_KERNELS=nvrtc pytest -m gpu tests/test_kernels_gpu.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple, Optional, Tuple

import torch

from vmq.errors import VmqError
from vmq.ops.nvrtc import build, gemm, scan, scan_train

MODES = ("auto", "native", "nvrtc")
ENV = "VMQ_CUDA_KERNELS"
IMPLS = {**gemm.IMPLS, **scan.IMPLS, **scan_train.IMPLS}
KERNELS = gemm.KERNELS + scan.KERNELS + scan_train.KERNELS


class CudaKernels(NamedTuple):
    """Which path serves vmq's CUDA kernels: ``path`` vmq._C, nvrtc or none; ``detail`` its version
    or why none."""

    path: str
    detail: str

    def describe(self) -> str:
        return {"vmq._C": "vmq._C ({})", "nvrtc": "nvrtc ({})", "none": "none ({})"}[self.path].format(self.detail)


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise VmqError(f"{ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def cupy_package() -> str:
    """The CuPy wheel that matches torch's CUDA major (``cupy-cuda13x``)."""
    major = (torch.version.cuda or "").split(".")[0]
    return f"cupy-cuda{major}x" if major.isdigit() else "cupy-cuda12x / cupy-cuda13x"


def install_hint() -> str:
    return (f"`pip install {cupy_package()}` (CuPy for torch's CUDA {torch.version.cuda or '?'}) builds the CUDA "
            "kernels at run time without a toolkit")


def unavailable() -> Optional[str]:
    """Why NVRTC cannot serve the CUDA kernels here, or None when it can."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if importlib.util.find_spec("cupy") is None:
        return f"CuPy is not installed: {install_hint()}"
    try:
        build.nvrtc_version()
    except Exception as exc:  # CuPy for another CUDA, a broken install, NVRTC missing: one line
        return f"CuPy's NVRTC does not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if build.source_root() is None:
        return "the CUDA kernel sources (csrc/cuda) are not found: reinstall vmq"
    if build.cuda_include_dir() is None:
        return "the CUDA headers (cuda_fp16.h) are not found: install nvidia-cuda-runtime or set CUDA_HOME"
    return None


@functools.lru_cache(maxsize=None)
def register(ops: Tuple[str, ...]) -> torch.library.Library:
    """Register the NVRTC implementations of ``ops`` for the CUDA dispatch key (once; the returned
    library keeps them registered). Needs no GPU: the dispatcher does not ask for one."""
    lib = torch.library.Library("vmq", "IMPL")
    for op in ops:
        lib.impl(op, IMPLS[op], "CUDA")  # over vmq._C's CUDA kernel, if any (the dispatcher allows it)
    return lib


def install(native_cuda: bool) -> CudaKernels:
    """Choose the path of the CUDA kernels (``native_cuda``: vmq._C has them) and register NVRTC's
    when it is the one."""
    chosen = mode()
    if native_cuda and chosen != "nvrtc":
        return CudaKernels("vmq._C", "compiled")
    if chosen == "native":
        return CudaKernels("none", f"vmq._C has no CUDA kernels, and {ENV}=native turns NVRTC off")
    why = unavailable()
    if why is None:
        import cupy

        register(tuple(sorted(IMPLS)))
        return CudaKernels("nvrtc", f"CuPy {cupy.__version__}, NVRTC {'.'.join(map(str, build.nvrtc_version()))}")
    if native_cuda:
        return CudaKernels("vmq._C", f"compiled; {ENV}=nvrtc cannot be served: {why}")
    return CudaKernels("none", f"vmq._C has no CUDA kernels; NVRTC cannot build them: {why}")


def missing_hint(status: CudaKernels) -> str:
    """What to do when a CUDA kernel is missing: install CuPy, or why NVRTC is off."""
    if status.path == "nvrtc":
        return ""
    if importlib.util.find_spec("cupy") is None:
        return f"; or {install_hint()}"
    return f" (the NVRTC path through CuPy is off: {status.detail})" if status.path == "none" else ""

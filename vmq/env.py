"""Facts about the environment: versions, CPU features, CUDA, optional packages and kernels."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from importlib import metadata
from typing import Dict

import torch

from vmq import __version__
from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.backend import BUILD_FIX
from vmq.recipe import DEVICE

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "f16c")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_info() -> Dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "features": [f for f in _CPU_FLAGS if f in flags]}


def check_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has; one clear error otherwise."""
    if not DEVICE.fullmatch(name):
        raise VmqError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VmqError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VmqError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def kernels() -> Dict:
    """The native extension's state, the path of the CUDA kernels, and which devices each vmq op
    has a compiled kernel for."""
    out = {"vmq._C": "built" if _library.NATIVE is not None else f"{_library.NATIVE_ERROR} (reference PyTorch ops "
                                                                   f"in use; {BUILD_FIX})"}
    if _library.NATIVE is not None:
        out["vmq._C.cuda_built"] = bool(_library.NATIVE.cuda_built)
        out["vmq._C.cpu_isa"] = _library.NATIVE.cpu_isa
    # which path serves the CUDA kernels: vmq._C (compiled) | nvrtc (CuPy <version>) | none (why)
    out["cuda_kernels"] = _library.CUDA_KERNELS.describe()
    for op in _library.SCHEMAS:
        devices = [d for d in ("cpu", "cuda") if _library.has_kernel(op, d)]
        out[f"op.{op}"] = ", ".join(devices) if devices else "reference only"
    out["mamba_ssm"] = "installed" if importlib.util.find_spec("mamba_ssm") is not None else "not installed"
    out["cupy"] = "installed" if importlib.util.find_spec("cupy") is not None else "not installed"
    return out


def collect() -> Dict:
    cuda = {"torch_cuda_build": torch.version.cuda or "none", "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [], "nvcc": shutil.which("nvcc") or "not found"}
    return {
        "versions": {"vmq": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": _version("torchvision"), "timm": _version("timm"),
                     "safetensors": _version("safetensors"), "numpy": _version("numpy")},
        "cpu": {**cpu_info(), "torch_threads": torch.get_num_threads()},
        "cuda": cuda,
        "kernels": kernels(),
    }

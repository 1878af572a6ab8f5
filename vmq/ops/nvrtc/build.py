"""NVRTC builds of ``csrc/cuda/*.cu``: the sources, the compile, the loaded kernels and their launch.

The ``.cu`` files are the ones nvcc builds into ``vmq._C``; under NVRTC (``__CUDACC_RTC__``)
they compile their kernels only (the host launch functions are guarded out), and this module
launches those kernels the way the host functions would. A :class:`Kernel` names one kernel
(a name expression with its template arguments) and the C++ parameter types it takes; the build
appends ``static_assert`` lines that hold the source to those types, to the struct mirrors of
:mod:`vmq.ops.nvrtc.structs` and to the constants that the launch tables of
:mod:`vmq.ops.nvrtc.gemm` / :mod:`vmq.ops.nvrtc.scan` copy, so that a kernel changed in C++
fails to build here rather than being launched with stale arguments.

Compiling needs CuPy (its NVRTC bindings) and the CUDA headers (``cuda_fp16.h``, ...), which
the ``nvidia-cuda-runtime`` wheel of a CUDA build of torch provides; it needs no GPU. Loading and
launching need the GPU. Builds are cached per architecture, loaded modules per device
(:func:`functools.lru_cache`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

# nvcc's flags for these files in setup.py's CUDAExtension, as NVRTC spells them: torch's half
# macros, C++17; no fast math (no flush-to-zero: the integer kernels' epilogues are bit-exact).
# -default-device: the launchers' declarations in launchers.h (host code) parse as unused device
# declarations; their definitions are guarded out of the .cu files.
OPTIONS = ("-std=c++17", "-default-device", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")

# a template that tells two types apart without the standard library (NVRTC has none)
_SAME = ("namespace vmq_nvrtc_check {\ntemplate <typename A, typename B> struct same { static constexpr bool value = "
         "false; };\ntemplate <typename A> struct same<A, A> { static constexpr bool value = true; };\n}\n")


class Kernel(NamedTuple):
    """One kernel of one source: ``name`` its NVRTC name expression, ``params`` its C++ parameter
    types (comma-separated, as the launch passes them), ``checks`` further C++ ``static_assert``
    lines (the constants and struct sizes its launch relies on)."""

    source: str
    name: str
    params: str
    checks: Tuple[str, ...] = ()


class Program(NamedTuple):
    image: bytes  # cubin (sm_XY) or PTX (compute_XY)
    lowered: Tuple[Tuple[str, str], ...]  # (name expression, lowered name)
    log: str


def source_root() -> Optional[Path]:
    """The directory holding ``cuda/launchers.h``: ``vmq/_csrc`` in an installed wheel (setup.py
    copies the sources there), else ``csrc`` of the source checkout (an editable install)."""
    package = Path(__file__).resolve().parents[2]
    for root in (package / "_csrc", package.parent / "csrc"):
        if (root / "cuda" / "launchers.h").is_file():
            return root
    return None


def sources() -> List[Path]:
    root = source_root()
    return sorted((root / "cuda").glob("*.cu")) if root is not None else []


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> Optional[str]:
    """A directory with the CUDA toolkit headers the kernels include (``cuda_fp16.h``), or None:
    where CuPy finds them (pip wheels, conda, a toolkit), else ``$CUDA_HOME`` / ``$CUDA_PATH`` or
    ``/usr/local/cuda``."""
    candidates = []
    try:
        from cuda import pathfinder  # CuPy's dependency that locates the CUDA wheels and toolkits

        candidates.append(pathfinder.find_nvidia_header_directory("cudart"))
    except Exception:  # not installed, an older version, or nothing found
        pass
    try:
        import cupy

        path = cupy.cuda.get_cuda_path()
        candidates.append(os.path.join(path, "include") if path else None)
    except Exception:
        pass
    candidates += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    return next((c for c in candidates if c and os.path.isfile(os.path.join(c, "cuda_fp16.h"))), None)


def _nvrtc():
    from cupy.cuda import nvrtc  # optional dependency: vmq[cupy]

    return nvrtc


def nvrtc_version() -> Tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def check_source(kernels: Sequence[Kernel]) -> str:
    """The C++ appended to a source for ``kernels``: each one's parameter types and its checks."""
    lines = [_SAME]
    for k in kernels:
        lines.append(f"static_assert(vmq_nvrtc_check::same<decltype(&{k.name}), void (*)({k.params})>::value, "
                     f'"{k.name}: its parameters are not ({k.params}), the launch of vmq/ops/nvrtc");')
        lines += [c for c in k.checks if c not in lines]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def compile_program(source: str, kernels: Tuple[Kernel, ...], arch: str) -> Program:
    """Compile ``csrc/cuda/<source>`` with NVRTC for ``arch`` (``sm_90``: a cubin; ``compute_90``:
    PTX), with ``kernels`` as its name expressions. No GPU needed."""
    root, include = source_root(), cuda_include_dir()
    if root is None:
        raise RuntimeError("vmq.ops.nvrtc: the CUDA kernel sources (csrc/cuda) are not found: reinstall vmq")
    if include is None:
        raise RuntimeError("vmq.ops.nvrtc: the CUDA headers (cuda_fp16.h) are not found: install the "
                           "nvidia-cuda-runtime wheel of your CUDA version or set CUDA_HOME")
    nvrtc = _nvrtc()
    path = root / "cuda" / source
    text = path.read_text(encoding="utf-8") + "\n" + check_source(kernels)
    options = (f"--gpu-architecture={arch}", f"-I{root}", f"-I{include}") + OPTIONS
    prog = nvrtc.createProgram(text, str(path), (), ())
    try:
        for k in kernels:
            nvrtc.addNameExpression(prog, k.name)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"vmq.ops.nvrtc: NVRTC failed to compile {source} for {arch} ({exc}):\n{log}") from None
        lowered = tuple((k.name, nvrtc.getLoweredName(prog, k.name)) for k in kernels)
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return Program(image, lowered, nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


@functools.lru_cache(maxsize=None)
def target(device_index: int) -> str:
    """The NVRTC architecture for a device: its own ``sm_XY`` when this NVRTC knows it (a cubin),
    else the newest ``compute_XY`` below it (PTX, which the driver compiles)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    cc = 10 * major + minor
    known = sorted(int(a) for a in _nvrtc().getSupportedArchs())
    if cc in known:
        return f"sm_{cc}"
    older = [a for a in known if a <= cc]
    if not older:
        raise RuntimeError(f"vmq.ops.nvrtc: NVRTC {'.'.join(map(str, nvrtc_version()))} cannot build for compute "
                           f"capability {major}.{minor} (it knows {', '.join(map(str, known))})")
    return f"compute_{older[-1]}"


def _current_context(device_index: int) -> None:
    """Make the device's primary context current on this thread (a thread that has not used the
    CUDA runtime yet may have none), as torch's device guard has set the runtime's device."""
    import cupy

    if cupy.cuda.driver.ctxGetCurrent() == 0:
        cupy.cuda.runtime.setDevice(device_index)


@functools.lru_cache(maxsize=None)
def _module(source: str, kernels: Tuple[Kernel, ...], device_index: int) -> Tuple[Tuple[str, int], ...]:
    """The loaded kernels of one source on one device: ``((name expression, CUfunction), ...)``."""
    import cupy

    program = compile_program(source, kernels, target(device_index))
    with torch.cuda.device(device_index):
        _current_context(device_index)
        module = cupy.cuda.driver.moduleLoadData(program.image)
        return tuple((name, cupy.cuda.driver.moduleGetFunction(module, low)) for name, low in program.lowered)


def function(kernel: Kernel, device_index: int) -> int:
    """The CUfunction of ``kernel`` on a device, built on first use (alone: a program of one
    kernel builds in a fraction of a second, all the kernels of a source in up to a few seconds)."""
    return dict(_module(kernel.source, (kernel,), device_index))[kernel.name]


def launch(op: str, kernel: Kernel, device: torch.device, grid: Sequence[int], block: int,
           args: Sequence[ctypes._SimpleCData]) -> None:
    """Launch ``kernel`` on torch's current stream of ``device``: ``grid`` (x[, y[, z]]) blocks of
    ``block`` threads, ``args`` ctypes values (structs by value) in the kernel's parameter order."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    grid = tuple(grid) + (1,) * (3 - len(grid))
    if min(grid) < 1 or grid[0] >= 2 ** 31 or max(grid[1:]) > 65535:
        raise RuntimeError(f"{op}: CUDA kernel launch failed: grid {grid} is out of range")
    with torch.cuda.device(index):
        fn = function(kernel, index)
        _current_context(index)
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = torch.cuda.current_stream(index).cuda_stream
        try:
            cupy.cuda.driver.launchKernel(fn, grid[0], grid[1], grid[2], block, 1, 1, 0, stream,
                                          ctypes.addressof(params), 0)
        except cupy.cuda.driver.CUDADriverError as exc:
            raise RuntimeError(f"{op}: CUDA kernel launch failed: {exc}") from None

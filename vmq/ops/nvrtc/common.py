"""What the NVRTC bindings share: the C++ bindings' tensor checks (``binding.h``) in Python, with
their messages, and the launch of a kernel of one source.

A failed check raises :class:`RuntimeError`, as a ``TORCH_CHECK`` of the compiled bindings does,
with the same text (dtypes and sizes written as c10 writes them: ``Float``, ``[2, 3]``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from vmq.ops.nvrtc import build
from vmq.ops.nvrtc.build import Kernel

_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
              torch.bool: "Bool"}


def dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def sizes(t: Tensor) -> str:
    return shape(t.shape)


def shape(dims: Sequence[int]) -> str:
    """Sizes as c10 writes an ``IntArrayRef``: ``[2, 3]``."""
    return "[" + ", ".join(str(d) for d in dims) + "]"


def check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(message)


def not_supported(op: str) -> str:
    """``binding.h``'s check_launch message for a launcher's cudaErrorNotSupported: a combination
    of dtypes or sizes no kernel is compiled for, which the binding's checks refuse first."""
    return f"{op}: no CUDA kernel for these dtypes / sizes (the binding should have refused them: a bug in vmq)"


def is_cuda(t: Tensor) -> bool:
    return t.is_cuda


def check_cuda(t: Tensor, ref: Tensor, op: str, name: str) -> None:
    check(is_cuda(t) and t.get_device() == ref.get_device(), f"{op}: {name} must be on {ref.device}")


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def check_tensor_cores(t: Tensor, op: str) -> None:
    """The tensor-core kernels use mma.sync shapes of sm_80 and later."""
    major, minor = _capability(t.get_device())
    check(major >= 8, f"{op}: needs a GPU of compute capability 8.0 or newer, this one is {major}.{minor}")


def rows(t: Tensor) -> int:
    """The product of all sizes but the last (1 for a 1-D tensor)."""
    return math.prod(t.shape[:-1])


def ptr(t: Optional[Tensor]) -> int:
    """``t``'s device address, 0 (a null pointer) for None."""
    return 0 if t is None else t.data_ptr()


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); the launchers clamp to it and their kernels loop
MAX32 = 2 ** 31 - 1  # the bindings' bound on the elements a kernel indexes with 32-bit offsets


def run(op: str, device: torch.device, plan: Optional[Tuple[Kernel, Sequence[int], int, Sequence]]) -> None:
    """Launch a plan ``(kernel, grid, block, args)`` of a launch table (None: nothing to launch)."""
    if plan is not None:
        kernel, grid, block, args = plan
        build.launch(op, kernel, device, grid, block, args)

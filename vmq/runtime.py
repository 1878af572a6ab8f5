"""Process-level settings: glibc's allocator for fast CPU inference, and full fp32 precision on CUDA.

A CPU forward allocates and frees activations of several MB per layer. glibc serves blocks that
large with ``mmap`` and returns them to the system on ``free``, so every forward faults its
activations back in page by page, and the kernel zeroes each page: measured on the reference
model at batch 64, about 6,000 page faults and 10-15 ms of system time per forward (a third of a
W8A8 forward). :func:`retain_freed_memory` makes glibc keep freed memory for reuse instead
(the effect of tcmalloc or jemalloc, which PyTorch's CPU tuning guide recommends); the process
then holds on to its peak footprint. ``vmq eval`` and ``vmq bench`` call it, so both sides of a
comparison run under the same allocator.

On CUDA, PyTorch runs fp32 convolutions through cuDNN with TF32 (10-bit mantissa) products by
default, and fp32 matmuls too where a program asked for it: results then differ from the CPU's
by about 1e-3 relative. :func:`ieee_float32` turns both off inside a block and restores what was
set before: calibration, compression and evaluation run in it, so that a run on a GPU agrees
with one on the CPU to fp32 rounding, whatever the process had set.

:func:`set_threads` sizes torch's CPU thread pools at a command's start (``--threads``; by
default from the CPUs the process may actually use, :func:`vmq.cpus.default_threads`), so that
vmq neither runs more threads than it has CPUs nor fewer than it could use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Iterator, Optional, Union

import torch

from vmq.cpus import default_threads
from vmq.errors import UsageError

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h>
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Ask glibc to serve every block from its heap and keep freed memory for reuse; True when applied.

    ``M_MMAP_MAX = 0`` (no block gets a mapping of its own: a raised ``M_MMAP_THRESHOLD`` is
    capped at 32 MiB, smaller than large models' activations), then a 1 GiB trim threshold and
    64 MiB of top padding. A no-op (False) where the C library is not glibc or refuses the first
    setting; the others are then left alone (on their own they would pin glibc's adaptive mmap
    threshold at its minimum). Affects the whole process, once.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and mallopt(_M_TOP_PAD, _TOP_PAD) == 1


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`vmq.cpus.default_threads`); returns them.

    The inter-op pool (which vmq does not use) gets as many, when torch still allows it to be
    sized (only before its first inter-op work); otherwise it is left as it is."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already started: its size is fixed for the process
            pass
    return n


def _old_switches() -> tuple:
    """PyTorch's older TF32 switches: (getter, setter, value inside :func:`ieee_float32`)."""
    cudnn = torch.backends.cudnn
    return ((torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),
            (lambda: cudnn.allow_tf32, lambda v: setattr(cudnn, "allow_tf32", v), False))


def _new_switches() -> tuple:
    """PyTorch's newer per-backend fp32 precision switches (all ``ieee`` inside :func:`ieee_float32`;
    the CPU's matmul one too, which the older matmul switch sets along)."""
    b = torch.backends
    return (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul)


@contextlib.contextmanager
def ieee_float32(device: Union[str, torch.device]) -> Iterator[None]:
    """Full fp32 (IEEE, no TF32) matmuls and cuDNN convolutions on CUDA inside the block; a no-op
    for other devices. Every switch it touches is restored on exit.

    PyTorch has older switches (``torch.set_float32_matmul_precision``,
    ``torch.backends.cudnn.allow_tf32``) and newer per-backend ``fp32_precision`` ones, and
    refuses to run a matmul when the two disagree: both kinds are set, consistently, and both
    restored (the older first, as setting them also sets the newer). An older switch that
    PyTorch cannot read (the process had already made them disagree) is set but not restored.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    old, new = _old_switches(), _new_switches()
    saved_new = [s.fp32_precision for s in new]
    saved_old = []
    for get, set_, inside in old:
        try:
            saved_old.append((set_, get()))
        except RuntimeError:
            pass
        set_(inside)
    for s in new:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for set_, value in saved_old:
            set_(value)
        for s, value in zip(new, saved_new):
            s.fp32_precision = value

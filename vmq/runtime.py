"""Process-level settings for fast CPU inference.

A CPU forward allocates and frees activations of several MB per layer. glibc serves blocks that
large with ``mmap`` and returns them to the system on ``free``, so every forward faults its
activations back in page by page, and the kernel zeroes each page: measured on the reference
model at batch 64, about 6,000 page faults and 10-15 ms of system time per forward (a third of a
W8A8 forward). :func:`retain_freed_memory` makes glibc keep freed memory for reuse instead
(the effect of tcmalloc or jemalloc, which PyTorch's CPU tuning guide recommends); the process
then holds on to its peak footprint. ``vmq eval`` and ``vmq bench`` call it, so both sides of a
comparison run under the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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

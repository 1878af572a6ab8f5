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

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Ask glibc to serve allocations below 1 GiB from its heap and keep freed memory; True when applied.

    A no-op (False) where the C library is not glibc. Affects the whole process, once.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD) == 1 and ok
    ok = mallopt(_M_TOP_PAD, _TOP_PAD) == 1 and ok
    return ok

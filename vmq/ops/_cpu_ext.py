"""Build the C++ CPU extensions in ``csrc/cpu`` on first use (JIT, cached by torch)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from vmq.errors import VmqError

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"


@functools.lru_cache(maxsize=None)
def build(name: str, source: str, fast_math: bool = True):
    """Compile ``csrc/cpu/<source>`` as the module ``name`` and import it; VmqError with the fix if it cannot.

    ``fast_math=False`` keeps IEEE evaluation order (multiply-adds are still fused), for kernels
    whose results must not depend on how the compiler reassociates their sums.
    """
    src = CSRC / source
    if not src.is_file():
        raise VmqError(f"extension source not found at {src}: run from a source checkout of vmq")
    import logging

    # importing cpp_extension on a CUDA build without a CUDA runtime logs a warning that is
    # irrelevant here (these extensions are CPU-only)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    flags = ["-O3", "-ffast-math" if fast_math else "-ffp-contract=fast", "-fopenmp"]
    if os.environ.get("VMQ_NATIVE_ARCH", "1") == "1":
        flags.append("-march=native")
    try:
        return cpp_extension.load(name=name, sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except Exception as exc:  # compiler or ninja missing
        raise VmqError(f"could not build the {name} extension ({exc}); install a C++ compiler and "
                       "`pip install ninja`") from exc

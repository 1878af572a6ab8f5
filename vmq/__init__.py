"""vmq: compression toolchain for Visual Mamba models.

The library entry points, imported on first use (so that ``import vmq`` and ``vmq --help`` do
not import torch):

* ``vmq.compress(recipe, model=None, images=None, stats=None, device=None)``
  (:func:`vmq.compress.api.compress`): compress a model with a recipe;
* :func:`vmq.save_packed`, :func:`vmq.load_packed`: the packed file.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"save_packed": "vmq.pack.format", "load_packed": "vmq.pack.format"}


def __getattr__(name: str):
    # torch is a heavy import: load it when an entry point is first used
    if name == "compress":  # the package vmq.compress, callable as the entry point
        return importlib.import_module("vmq.compress")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vmq' has no attribute {name!r}")


__all__ = ["__version__", "compress", "save_packed", "load_packed"]

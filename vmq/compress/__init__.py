"""Compression: the engine, the registered methods and the library entry point.

``vmq.compress`` is both this package and the entry point: calling it, ``vmq.compress(recipe,
model=None, images=None, stats=None, device=None)``, is :func:`vmq.compress.api.compress`.
"""

import sys
import types

from vmq.compress.api import CompressResult, compress, load_model, read_recipe, recipe_path_for
from vmq.compress.engine import compress_model
from vmq.compress.methods import METHODS, BlockJob, Method, method_for, register_method


class _CallablePackage(types.ModuleType):
    """Lets ``vmq.compress(...)`` call :func:`compress` although ``vmq.compress`` is this package."""

    def __call__(self, *args, **kwargs) -> CompressResult:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["compress", "CompressResult", "compress_model", "load_model", "read_recipe", "recipe_path_for", "METHODS",
           "BlockJob", "Method", "method_for", "register_method"]

"""The compression methods, one file each, registered under their recipe ``method`` names."""

from vmq.compress.methods import kmeans, ptq4vm, pts, rtn, smoothquant, vimvq  # noqa: F401  (registers them)
from vmq.compress.methods.base import METHODS, BlockJob, Method, method_for, register_method

__all__ = ["METHODS", "BlockJob", "Method", "method_for", "register_method"]

"""Small helpers on module trees, shared by the engine, the packed format and the tools."""

from __future__ import annotations

from typing import List

from torch import nn


def set_module(root: nn.Module, name: str, child: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``child``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, child)


def linear_names(module: nn.Module) -> List[str]:
    """Names of the ``nn.Linear`` submodules of ``module``, in module order."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


__all__ = ["set_module", "linear_names"]

"""Which layers a recipe stage compresses: ``targets`` and ``ignore`` (exact names or ``re:`` patterns)."""

from __future__ import annotations

import re
from typing import List

from torch import nn

from vmq.errors import VmqError


def matches(name: str, patterns: List[str]) -> bool:
    return any(p == name or (p.startswith("re:") and re.search(p[3:], name)) for p in patterns)


def resolve_targets(model: nn.Module, block_prefixes: List[str], targets: List[str], ignore: List[str],
                    key: str) -> List[str]:
    """Names of the linear layers matched by ``targets`` and not by ``ignore``, all inside blocks
    (``block_prefixes``). ``key`` is the recipe block that errors name (``quantization`` or ``vq``)."""
    modules = dict(model.named_modules())
    for field, patterns in (("targets", targets), ("ignore", ignore)):
        for p in patterns:
            if not p.startswith("re:") and p not in modules:
                raise VmqError(f"{key}.{field}: the model has no layer named {p!r}")
            if field == "targets" and not p.startswith("re:") and not isinstance(modules[p], nn.Linear):
                raise VmqError(f"{key}.targets: {p!r} is a {type(modules[p]).__name__}, not a linear layer")
    names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and matches(n, targets)
             and not matches(n, ignore)]
    outside = [n for n in names if not n.startswith(tuple(block_prefixes))]
    if outside:
        raise VmqError(f"{key}.targets: only linear layers inside blocks can be quantized, not {outside[0]!r}")
    if not names:
        raise VmqError(f"{key}.targets match no linear layer of the model (after ignore)")
    return names


__all__ = ["matches", "resolve_targets"]

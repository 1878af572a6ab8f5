"""Runtime layers: what compressed layers become and what packed files load into, one file per kind.

``KINDS`` maps each kind's name (as recorded in a packed file) to its class.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple, Type

from torch import nn

from vmq.layers.base import RuntimeLayer
from vmq.layers.int_linear import QuantizedLinear
from vmq.layers.vq_linear import VQLinear

KINDS: Dict[str, Type[RuntimeLayer]] = {cls.kind: cls for cls in (QuantizedLinear, VQLinear)}


def runtime_layers(model: nn.Module) -> Iterator[Tuple[str, RuntimeLayer]]:
    """(name, layer) of every runtime layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, RuntimeLayer):
            yield name, m


__all__ = ["RuntimeLayer", "QuantizedLinear", "VQLinear", "KINDS", "runtime_layers"]

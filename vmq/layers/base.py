"""What every runtime (packed, inference-only) layer kind states about itself.

A runtime layer replaces an ``nn.Linear`` of the floating-point model after compression and is
what a packed file loads into. Each kind owns its format: its ``kind`` name, its ``spec`` (the
JSON metadata that rebuilds it), its tensors under their packed names, how to rebuild itself from
both, and its floating-point equivalent weight. ``vmq.pack`` keeps the container and maps kinds
to classes; it knows no layer's internals.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional, Tuple

from torch import Tensor, nn


class RuntimeLayer(nn.Module):
    kind: ClassVar[str]
    in_features: int
    out_features: int

    def spec(self) -> dict:
        """JSON-ready metadata that, with :meth:`packed_tensors`, rebuilds the layer."""
        raise NotImplementedError

    def packed_tensors(self) -> Dict[str, Tensor]:
        """The layer's tensors under their packed names (relative to the layer's name)."""
        raise NotImplementedError

    @classmethod
    def from_packed(cls, spec: dict, tensors: Dict[str, Tensor], shape: Tuple[int, int]) -> "RuntimeLayer":
        """Rebuild from :meth:`spec` and the tensors (popped from ``tensors``); ``shape`` is (out, in)."""
        raise NotImplementedError

    def float_weight(self) -> Tensor:
        """The (out, in) fp32 weight this layer computes with, any smoothing folded in."""
        raise NotImplementedError

    def stored_weights(self) -> int:
        """How many weights the layer represents (for parameter counts)."""
        return self.out_features * self.in_features

    def absorb_output_scale(self, rows: Tuple[int, int], scale: Tensor) -> bool:
        """Divide output channels ``rows`` by ``scale`` without changing stored integers; whether it could."""
        return False

    def bias_tensor(self) -> Optional[Tensor]:
        return getattr(self, "bias", None)

    def present(self, *names: str) -> Dict[str, Tensor]:
        """The buffers ``names`` that the layer has (optional ones may be None), by name."""
        return {name: t for name in names if (t := getattr(self, name)) is not None}


__all__ = ["RuntimeLayer"]

"""The model-family protocol: what the compression engine and the tools need to know of a model family.

A family (Vim, VMamba, ...) is one file in ``vmq/models/`` holding its modules, its registered
models and a :class:`ModelFamily` subclass. Nothing outside ``vmq/models/`` knows a family's
module names, block call or configuration: the engine (``vmq.compress``), the calibration pass
(``vmq.calib``), the packed format (``vmq.pack``), ``vmq bench`` and the CLI ask the family.

**Block I/O.** A model is an embedding, a sequence of blocks and a head. What one block passes to
the next is a :data:`BlockIO`: a tuple of batch-first tensors (``None`` where a slot is empty,
e.g. Vim's residual before the first block). The engine slices, concatenates and batches block
I/O with the helpers here without knowing what the slots mean; :meth:`ModelFamily.block_output`
names the tensor that losses compare.

**Smoothing folds.** A per-input-channel smoothing scale ``s`` of a quantized layer can be folded
into the operation that produces the layer's input when that is exact: :class:`Fold` says which
(a norm's weight and bias, or some output rows of a preceding linear layer).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from vmq.errors import VmqError

BlockIO = Tuple[Optional[Tensor], ...]


@dataclass(frozen=True)
class Fold:
    """``layer``'s smoothing scale is absorbed by ``into`` (both named relative to the block).

    ``rows``: the ``(start, stop)`` output channels of ``into`` (a linear layer) that are
    ``layer``'s input; ``None`` when ``into`` is a norm whose whole output is ``layer``'s input.
    """

    layer: str
    into: str
    rows: Optional[Tuple[int, int]] = None


@dataclass(frozen=True)
class BenchGroups:
    """How ``vmq bench --layers`` groups a model's modules.

    ``order``: the groups as reported. ``remainders``: a group that contains other groups
    (e.g. a mixer holding its projections) is reported as its own time minus theirs, under a label.
    """

    order: Tuple[str, ...]
    remainders: Dict[str, Tuple[str, Tuple[str, ...]]]


class ModelFamily(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    model_class: ClassVar[Type[nn.Module]]
    config_class: ClassVar[type]
    bench_groups: ClassVar[BenchGroups]

    # -- building and configuration --------------------------------------------------------
    def build(self, config: Any, **overrides) -> nn.Module:
        """A model of ``config`` with some fields overridden (timm's ``num_classes``, ``img_size``...)."""
        return self.model_class(config, **overrides)

    def config_of(self, model: nn.Module) -> Any:
        return model.cfg

    def config_to_dict(self, config: Any) -> dict:
        return config.to_dict()

    def config_from_dict(self, d: dict) -> Any:
        return self.config_class.from_dict(d)

    def checkpoint_filter(self, state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
        """An official checkpoint's state dict in this family's parameter names (timm's ``checkpoint_filter_fn``)."""
        return state_dict

    # -- running block by block -----------------------------------------------------------
    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """The blocks in order, each with its name prefix (ending with a dot)."""

    @abc.abstractmethod
    def embed(self, model: nn.Module, images: Tensor) -> BlockIO:
        """The first block's input for ``images`` (N, C, H, W)."""

    @abc.abstractmethod
    def run_block(self, block: nn.Module, io: BlockIO) -> BlockIO:
        """One block's output, the next block's input."""

    @abc.abstractmethod
    def block_output(self, io: BlockIO) -> Tensor:
        """The tensor of a block's output that block losses compare."""

    @abc.abstractmethod
    def head(self, model: nn.Module, io: BlockIO) -> Tensor:
        """The logits from the last block's output ``io`` (final norm, pooling, classifier)."""

    # -- compression ----------------------------------------------------------------------
    @abc.abstractmethod
    def default_targets(self) -> List[str]:
        """The layers PTQ and VQ quantize by default (recipe ``targets`` patterns)."""

    def smoothing_folds(self, block: nn.Module) -> List[Fold]:
        """Where each target's smoothing scale folds exactly, in the order to apply them."""
        return []

    @contextlib.contextmanager
    def scan_implementation(self, model: nn.Module, impl: str) -> Iterator[None]:
        """Run every selective scan of ``model`` with the one-direction scan ``impl`` of
        :func:`vmq.ops.scan.one_direction_scan` (e.g. ``"train"``, differentiable) meanwhile."""
        yield

    # -- tools ----------------------------------------------------------------------------
    @abc.abstractmethod
    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        """(channels, height, width) of the images ``model`` takes."""

    def bench_group(self, module_name: str) -> Optional[str]:
        """The ``bench --layers`` group of a module, or None for modules not timed on their own."""
        return None

    # -- block I/O helpers (shared by every family) ---------------------------------------
    def embed_batched(self, model: nn.Module, images: Tensor, batch_size: int) -> BlockIO:
        with torch.no_grad():
            return io_cat([self.embed(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    def run_batched(self, block: nn.Module, io: BlockIO, batch_size: int) -> BlockIO:
        """Run ``block`` over every sample of ``io`` in batches (no gradients)."""
        with torch.no_grad():
            return io_cat([self.run_block(block, part) for part in io_batches(io, batch_size)])


@contextlib.contextmanager
def scan_set(mixers: Sequence[nn.Module], impl: str) -> Iterator[None]:
    """Set the ``scan`` attribute of every mixer to ``impl`` meanwhile (a family's
    :meth:`ModelFamily.scan_implementation` over its mixers)."""
    saved = [m.scan for m in mixers]
    for m in mixers:
        m.scan = impl
    try:
        yield
    finally:
        for m, scan in zip(mixers, saved):
            m.scan = scan


def io_len(io: BlockIO) -> int:
    return next(t.shape[0] for t in io if t is not None)


def io_slice(io: BlockIO, index) -> BlockIO:
    """The samples ``index`` (a slice or an index tensor) of every slot."""
    return tuple(None if t is None else t[index] for t in io)


def io_batches(io: BlockIO, batch_size: int) -> Iterator[BlockIO]:
    n = io_len(io)
    for i in range(0, n, batch_size):
        yield io_slice(io, slice(i, i + batch_size))


def io_cat(parts: Sequence[BlockIO]) -> BlockIO:
    return tuple(None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


def io_finite(io: BlockIO) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in io if t is not None)


FAMILIES: Dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family whose model class ``model`` is an instance of."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise VmqError(f"{type(model).__name__} belongs to no registered model family")


__all__ = ["BlockIO", "Fold", "BenchGroups", "ModelFamily", "FAMILIES", "register_family", "family_of", "scan_set", "io_len",
           "io_slice", "io_batches", "io_cat", "io_finite"]

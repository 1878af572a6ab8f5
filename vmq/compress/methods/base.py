"""What a compression method is to the engine, and the registry from recipe ``method`` keys to methods.

A method is a class registered under its recipe name for one recipe block (``quantization`` or
``vq``). The engine (:mod:`vmq.compress.engine`) drives it block by block: for each block holding
targets it calls :meth:`Method.prepare` (replace the targets by learnable layers), :meth:`Method.fit`,
freezes the layers into runtime layers (their ``freeze()``), measures each layer's output SNR,
then calls :meth:`Method.finish` and :meth:`Method.report`. A new method is one file under
``vmq/compress/methods/`` with a class decorated by :func:`register_method`, plus whatever options it
needs in its recipe block's schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Type

from torch import Tensor, nn

from vmq.activations import ActivationStore
from vmq.calib import CalibStats, LayerStats, observe_inputs
from vmq.distributed import Part
from vmq.errors import VmqError
from vmq.models.family import BlockIO, ModelFamily, io_len, io_slice
from vmq.modules import set_module
from vmq.targets import resolve_targets


@dataclass
class BlockJob:
    """One block to compress, as the engine hands it to a method."""

    family: ModelFamily
    index: int
    prefix: str  # the block's name prefix (ends with a dot)
    block: nn.Module
    names: List[str]  # the target layers, relative to the block
    q_io: BlockIO  # the block's inputs from the already compressed blocks before it
    fp_out: BlockIO  # the floating-point block's outputs on floating-point inputs
    stats: CalibStats
    batch_size: int
    seed: int
    store: Optional[ActivationStore] = None  # where block activations are kept (None: the block's device)
    #: which samples of the calibration set ``q_io`` and ``fp_out`` hold (a shard under
    #: torch.distributed: losses, gradients and observed inputs then cover every process's)
    part: Optional[Part] = None
    #: for methods that look at the whole model (:meth:`Method.needs_logits`): the logits from this
    #: block's output through the blocks after it (still floating point) and the head, and the
    #: floating-point model's logits on this process's calibration images
    tail: Optional[Callable[[BlockIO], Tensor]] = None
    fp_logits: Optional[Tensor] = None
    target: Tensor = field(init=False)  # what block losses compare with; a method may change it

    def __post_init__(self) -> None:
        self.target = self.family.block_output(self.fp_out)
        if self.part is None:
            self.part = Part.whole(io_len(self.q_io), self.batch_size)

    def layer_stats(self, name: str) -> LayerStats:
        """The calibration statistics of layer ``name``, on the block's device."""
        return self.stats.layers[self.prefix + name].to(self.target.device)

    def observe(self, names: List[str], num_samples: int) -> Dict[str, Tensor]:
        """The inputs layers ``names`` see on the first ``num_samples`` of the block's inputs (of the
        whole set: under torch.distributed each process runs the ones it holds, and all get all)."""
        if not self.part.dist.active:
            return observe_inputs(self.family, self.block, names, self.q_io, num_samples, self.batch_size,
                                  self.prefix)
        head = self.part.head(num_samples)
        seen = {}
        if head.stop > 0:
            seen = observe_inputs(self.family, self.block, names, io_slice(self.q_io, head), head.stop,
                                  self.batch_size, self.prefix)
        return {name: self.part.dist.gather_cat(seen.get(name), self.target.device) for name in names}

    def activation_store(self) -> ActivationStore:
        """Where this block's activations are kept (the engine's store; else the block's device)."""
        return self.store if self.store is not None else ActivationStore(self.target.device)

    def run(self, io: BlockIO) -> BlockIO:
        """The block's outputs on all of ``io``, kept where the store places them."""
        return self.activation_store().run(self.family, self.block, io, self.batch_size)

    def install(self, layers: Dict[str, nn.Module]) -> None:
        for name, layer in layers.items():
            set_module(self.block, name, layer)


METHODS: Dict[str, Dict[str, Type["Method"]]] = {"quantization": {}, "vq": {}}


def register_method(cls: Type["Method"]) -> Type["Method"]:
    table = METHODS[cls.stage_key]
    if cls.name in table:
        raise ValueError(f"method {cls.name!r} is registered twice for {cls.stage_key}")
    table[cls.name] = cls
    return cls


def method_for(stage_key: str, stage: Any, source: str = "recipe") -> "Method":
    """The method a recipe block asks for, checked against the block (one clear error otherwise)."""
    table = METHODS[stage_key]
    if stage.method not in table:
        raise VmqError(f"{source}: recipe key '{stage_key}.method': unknown method {stage.method[:80]!r} "
                       f"(methods: {', '.join(table)})")
    method = table[stage.method](stage)
    problem = method.check_stage()
    if problem:
        raise VmqError(f"{source}: recipe key '{stage_key}': {problem}")
    return method


class Method:
    name: ClassVar[str]
    stage_key: ClassVar[str]
    what: ClassVar[str] = "compressed"  # for messages: "quantized block 3 produced NaN"
    timing_key: ClassVar[str] = "compress_seconds"  # the results key of the compression time
    #: the one-direction scan (vmq.ops.scan.one_direction_scan) the model runs while this method
    #: works; None keeps the model's inference scan
    scan: ClassVar[Optional[str]] = None
    #: the dataclass :meth:`report` returns (a resumed run rebuilds recorded reports from their fields)
    report_type: ClassVar[type]

    def __init__(self, stage: Any):
        self.stage = stage

    def needs_logits(self) -> bool:
        """Whether :meth:`fit` reads the model's logits (``BlockJob.tail`` and ``fp_logits``)."""
        return False

    def check_stage(self) -> Optional[str]:
        """What is wrong with the recipe block for this method, or None."""
        return None

    def targets(self, model: nn.Module, family: ModelFamily) -> List[str]:
        """The layers to compress; fails before any work when they cannot be."""
        prefixes = [prefix for prefix, _ in family.blocks(model)]
        targets = self.stage.targets if self.stage.targets is not None else family.default_targets()
        return resolve_targets(model, prefixes, targets, self.stage.ignore, self.stage_key)

    def prepare(self, job: BlockJob) -> Dict[str, nn.Module]:
        """Replace ``job.names`` in the block by learnable layers (installed) and initialise them."""
        raise NotImplementedError

    def fit(self, job: BlockJob, layers: Dict[str, nn.Module]) -> Dict[str, Any]:
        """Learn, in place; returns what the reports need (losses)."""
        return {}

    def finish(self, job: BlockJob, layers: Dict[str, nn.Module], frozen: Dict[str, nn.Module],
               info: Dict[str, Any]) -> None:
        """After freezing and the SNR measurement (e.g. fold smoothing scales); may add to ``info``."""

    def report(self, job: BlockJob, name: str, layer: nn.Module, frozen: nn.Module, snr: float,
               info: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def label(self) -> str:
        """A short label of what the recipe block asks for (``W4A8``, ``2bit-d2k16``)."""
        raise NotImplementedError

    def summary(self, reports: List[Any]) -> Dict[str, Any]:
        """Model-level figures of the per-layer reports, for the results."""
        return {}


__all__ = ["BlockJob", "Method", "METHODS", "register_method", "method_for"]

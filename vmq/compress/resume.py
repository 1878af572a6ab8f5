"""Compression progress, block by block: what the engine records of a finished block and how it
comes back on ``--resume`` (the folder itself is :mod:`vmq.progress`).

A finished block is recorded whole: each runtime layer as its kind, spec and packed tensors (as in
the packed file, :mod:`vmq.pack.format`), every other tensor of the block under its own name (so
that what a method changed outside its targets, such as smoothing folded into a norm, comes back
too), and the block's per-layer reports. A resumed run rebuilds the recorded blocks from this,
then runs them forward on the calibration images to get the next block's inputs: the same
batches in the same order as the interrupted run, hence the same bits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, nn

from vmq.calib import CalibStats, model_fingerprint
from vmq.compress.methods.base import Method
from vmq.distributed import Part
from vmq.errors import VmqError
from vmq.pack.format import load_runtime_state, packed_state
from vmq.progress import images_sha256, tensor_sha256
from vmq.recipe import Recipe

#: recipe keys that do not change the compressed model (``eval``), or whose contents the identity
#: hashes instead of their paths (``model.checkpoint``: the weights; ``calibration.data``: the images)
NOT_IN_IDENTITY = (("eval",), ("model", "checkpoint"), ("calibration", "data"))


def compress_identity(command: str, recipe: Recipe, model: nn.Module, images: Tensor,
                      given_stats: Optional[CalibStats], blocks: int, part: Part) -> Dict[str, Any]:
    """What a compression run depends on, for :meth:`vmq.progress.ProgressStore.open`; ``images``
    are this process's ``part`` of the calibration set (the identity is the same on every rank,
    whatever the number of processes)."""
    settings = recipe.model_dump(mode="json")
    for path in NOT_IN_IDENTITY:
        node = settings
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    stats = None
    if given_stats is not None:
        stats = tensor_sha256((f"{name}.{what}", getattr(st, what)) for name, st in sorted(given_stats.layers.items())
                              for what in ("min", "max", "sq_sum"))
    return {"command": command, "settings": settings, "model_sha256": model_fingerprint(model),
            "images_sha256": images_sha256(images, part.unit, part.dist), "stats_sha256": stats, "blocks": blocks}


def block_record(block: nn.Module, reports: List[Any]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """A compressed block as progress tensors and JSON-ready metadata (its reports included)."""
    tensors, specs = packed_state(block)
    return tensors, {"layers": specs, "reports": [dataclasses.asdict(r) for r in reports]}


def restore_block(block: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, Any], method: Method,
                  where: str) -> List[Any]:
    """Make ``block`` (floating point, as built) what :func:`block_record` recorded; its reports.

    ``where`` names the record in error messages."""
    try:
        specs, fields = dict(meta["layers"]), list(meta["reports"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VmqError(f"{where}: broken progress record ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    load_runtime_state(block, specs, tensors, where, "the block")
    try:
        return [method.report_type(**f) for f in fields]
    except TypeError as exc:
        raise VmqError(f"{where}: broken progress record ({exc})".splitlines()[0]) from None


__all__ = ["compress_identity", "block_record", "restore_block", "NOT_IN_IDENTITY"]

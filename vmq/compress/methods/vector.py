"""Weight vector quantization: what ViM-VQ and the k-means baseline share.

Each target's weight is cut into sub-vectors with k-means codebooks (importance: the input's
second moment from the calibration stats) and becomes a :class:`~vmq.vq.convex.ConvexVQLinear`;
with quantized activations, their static ranges come from a truncation search on the inputs the
compressed blocks feed the block, as in PTQ. Frozen, it is a :class:`vmq.layers.VQLinear`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vmq.compress.methods.base import BlockJob, Method
from vmq.errors import VmqError
from vmq.models.family import ModelFamily
from vmq.optimise import LOSSES, block_loss
from vmq.quant.recipe import Truncation
from vmq.quant.truncation import activation_range_search
from vmq.vq.codebook import Layout, init_codebook
from vmq.vq.convex import ConvexVQLinear
from vmq.vq.recipe import VQStage, vq_label

TRUNCATION = Truncation()  # the PTQ recipe's default truncation search, for static activation ranges


@dataclass
class VQLayerReport:
    name: str
    dim: int
    size: int
    groups: int
    weights: int
    code_bits_per_weight: float  # codes only
    bits_per_weight: float  # codes + codebooks + row scales
    a_bits: Optional[int]
    snr_db: float
    seconds: float  # k-means and search of the layer's block, shared out by weight count
    loss_kmeans: Optional[float] = None  # block loss, repeated on each of its layers
    loss_final: Optional[float] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["snr_db"]):
            d["snr_db"] = None
        return d


class VectorMethod(Method):
    stage_key = "vq"
    what = "vector-quantized"
    timing_key = "vq_seconds"
    report_type = VQLayerReport

    stage: VQStage

    def label(self) -> str:
        return vq_label(self.stage)

    def summary(self, reports: List[VQLayerReport]) -> Dict[str, Any]:
        weights = sum(r.weights for r in reports)
        return {"code_bits_per_weight": round(sum(r.code_bits_per_weight * r.weights for r in reports) / weights, 4),
                "bits_per_weight": round(sum(r.bits_per_weight * r.weights for r in reports) / weights, 4),
                "vq_weights": weights}

    def targets(self, model: nn.Module, family: ModelFamily) -> List[str]:
        """The targets; fails (before any work) when a target's codebook cannot fit its sub-vectors."""
        targets = super().targets(model, family)
        modules = dict(model.named_modules())
        cb = self.stage.codebook
        for t in targets:
            lay = Layout.of(modules[t].weight, cb)
            smallest = min(sl.stop - sl.start for _, sl in lay.group_slices())
            if cb.size > smallest:
                raise VmqError(f"{t}: codebook.size {cb.size} exceeds its {smallest} sub-vectors of dim {cb.dim} "
                               f"(weight {tuple(modules[t].weight.shape)}"
                               + (f", {lay.rows_per_group} rows per group" if lay.groups > 1 else "")
                               + "); use a smaller codebook or more rows per group")
        return targets

    def prepare(self, job: BlockJob) -> Dict[str, ConvexVQLinear]:
        stage = self.stage
        layers = {}
        for j, name in enumerate(job.names):
            lin = job.block.get_submodule(name)
            stats = job.layer_stats(name)
            h = stats.second_moment if stage.kmeans.importance else None
            layout, codebook, codes, scale, imp = init_codebook(job.prefix + name, lin.weight, stage.codebook,
                                                                stage.kmeans.iterations, h, job.seed * 1000 + j)
            layers[name] = ConvexVQLinear(lin, layout, codebook, codes, scale, imp, stage.input_activations,
                                          stats.tokens)
        job.install(layers)
        if stage.input_activations is not None:
            self._init_activation_ranges(job, layers)
        return layers

    @torch.no_grad()
    def _init_activation_ranges(self, job: BlockJob, layers: Dict[str, ConvexVQLinear]) -> None:
        """Static ranges by truncation search on the inputs each layer sees when the compressed
        blocks before feed this one (its own weights already k-means VQ)."""
        saved = {name: q.a_quant for name, q in layers.items()}
        try:
            for q in layers.values():
                q.a_quant = None
            seen = job.observe(list(layers), TRUNCATION.num_images)
        finally:
            for name, q in layers.items():
                q.a_quant = saved[name]
        for name, q in layers.items():
            a = q.a_quant
            a.set_range(*activation_range_search(seen[name], a.bits, TRUNCATION.p, TRUNCATION.grid,
                                                 per_token=a.granularity == "token_static"))

    def finish(self, job: BlockJob, layers, frozen, info: Dict[str, Any]) -> None:
        if info.get("loss_kmeans") is not None:
            info["loss_final"] = block_loss(job.family, job.block, job.q_io, job.target,
                                            LOSSES[self.stage.search.loss], self.stage.search.batch_size, job.part)
        info["block_weights"] = sum(f.out_features * f.in_features for f in frozen.values())

    def report(self, job: BlockJob, name: str, layer, frozen, snr: float, info: Dict[str, Any]) -> VQLayerReport:
        bits = frozen.storage_bits()
        before, after = info.get("loss_kmeans"), info.get("loss_final")
        return VQLayerReport(
            job.prefix + name, frozen.dim, frozen.size, frozen.weight_codebook.shape[0], bits["weights"],
            round(bits["codes"] / bits["weights"], 4),
            round((bits["codes"] + bits["codebook"] + bits["scale"]) / bits["weights"], 4),
            frozen.a_bits, round(snr, 3), round(info["seconds"] * bits["weights"] / info["block_weights"], 3),
            None if before is None else round(before, 6), None if after is None else round(after, 6))


__all__ = ["VectorMethod", "VQLayerReport"]

"""Uniform (integer) post-training quantization: what PTQ4VM and its baselines share.

Each target becomes a :class:`~vmq.quant.qlinear.QuantLinear` (fake quantization); a method
chooses how it is initialised (:meth:`UniformMethod.init_layer`: smoothing, weight step sizes,
activation ranges) and whether it learns (``fit``). Frozen, it is a
:class:`vmq.layers.QuantizedLinear`; explicit smoothing scales are then folded into the operation
before the layer where the family says that is exact (:meth:`ModelFamily.smoothing_folds`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from vmq.calib import LayerStats
from vmq.compress.methods.base import BlockJob, Method
from vmq.layers import RuntimeLayer
from vmq.quant.qlinear import QuantLinear
from vmq.quant.recipe import QuantizationStage, scheme_label
from vmq.quant.smooth import smoothing_scale
from vmq.quant.truncation import activation_range_search, weight_scale_search
from vmq.quant.quantizers import weight_qmax


@dataclass
class LayerReport:
    name: str
    w_bits: int
    w_strategy: str
    a_bits: Optional[int]
    a_strategy: Optional[str]
    smoothing: str  # "none", "explicit" or "folded into <module>"
    snr_db: float
    jlss_loss_before: Optional[float] = None  # of the block on the images it learned from, repeated on each layer
    jlss_loss_after: Optional[float] = None
    jlss_holdout_before: Optional[float] = None  # the same on the held-out calibration images
    jlss_holdout_after: Optional[float] = None
    jlss_steps_kept: Optional[int] = None  # the step whose parameters the block kept (0: its start)

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["snr_db"]):  # an exact layer; JSON has no infinity
            d["snr_db"] = None
        return d


class UniformMethod(Method):
    stage_key = "quantization"
    what = "quantized"
    timing_key = "quantize_seconds"
    report_type = LayerReport
    needs_activations = True  # methods that smooth move activation scales into the weights

    stage: QuantizationStage

    def check_stage(self) -> Optional[str]:
        if self.needs_activations and self.stage.scheme.input_activations is None:
            return (f"method {self.name} smooths activations into weights; it needs scheme.input_activations "
                    "(use method rtn for weight-only quantization)")
        return None

    def label(self) -> str:
        return scheme_label(self.stage)

    # -- steps ----------------------------------------------------------------------------
    def prepare(self, job: BlockJob) -> Dict[str, QuantLinear]:
        scheme = self.stage.scheme
        acts = scheme.input_activations
        layers = {}
        for name in job.names:
            layers[name] = QuantLinear(job.block.get_submodule(name), scheme.weights.num_bits,
                                       acts.num_bits if acts else None, acts.strategy if acts else "token_static",
                                       job.layer_stats(name).tokens, w_strategy=scheme.weights.strategy)
        job.install(layers)
        samples = self.observe_samples(job, layers)
        for name, q in layers.items():
            self.init_layer(q, job.layer_stats(name), samples.get(name))
        return layers

    def observe_samples(self, job: BlockJob, layers: Dict[str, QuantLinear]) -> Dict[str, Tensor]:
        """Raw inputs of the layers for the initialisation (none unless the method searches ranges)."""
        return {}

    @torch.no_grad()
    def init_layer(self, q: QuantLinear, stats: LayerStats, samples: Optional[Tensor]) -> None:
        """Min-max: weight step sizes from max |w|, activation ranges from the calibration stats."""
        self.set_weight_scale(q, None)
        a = q.a_quant
        if a is not None and a.granularity != "token_dynamic":
            a.set_range(*stats.ranges(q.smooth if q.smoothing else None, per_token=a.granularity == "token_static"))

    @staticmethod
    def set_weight_scale(q: QuantLinear, search) -> None:
        """Weight step sizes: min-max, or by ``search(weights, bits)`` over rows (channels or the tensor)."""
        w = q.smoothed_weight()
        rows = w if q.w_quant.strategy == "channel" else w.reshape(1, -1)
        if search is None:
            scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / weight_qmax(q.w_bits)
        else:
            scale = search(rows, q.w_bits)
        q.w_quant.scale.copy_(scale)

    def finish(self, job: BlockJob, layers, frozen, info: Dict[str, Any]) -> None:
        info["folded"] = fold_smoothing(job, frozen)

    def report(self, job: BlockJob, name: str, layer, frozen, snr: float, info: Dict[str, Any]) -> LayerReport:
        folded = info["folded"]
        smoothing = (f"folded into {job.prefix}{folded[name]}" if name in folded
                     else "explicit" if frozen.smooth_scale is not None else "none")
        def r6(key):
            return None if info.get(key) is None else round(info[key], 6)

        return LayerReport(job.prefix + name, frozen.w_bits, frozen.w_strategy, frozen.a_bits, frozen.a_strategy,
                           smoothing, round(snr, 3), r6("loss_before"), r6("loss_after"), r6("holdout_before"),
                           r6("holdout_after"), info.get("steps_kept"))


class SmoothingMethod(UniformMethod):
    """Methods that start from SmoothQuant smoothing scales, ``s = max|x|^a / max|w|^(1-a)``."""

    @torch.no_grad()
    def init_layer(self, q: QuantLinear, stats: LayerStats, samples: Optional[Tensor]) -> None:
        q.set_smoothing(smoothing_scale(stats.channel_absmax, q.weight, self.stage.smoothing.alpha))
        super().init_layer(q, stats, samples)


class TruncatingMethod(SmoothingMethod):
    """Smoothing, then static truncation: weight step sizes and activation ranges that minimise
    the Lp error over a grid, the activation ranges searched on the inputs the already
    quantized blocks feed the layer."""

    scan = "train"

    def observe_samples(self, job: BlockJob, layers: Dict[str, QuantLinear]) -> Dict[str, Tensor]:
        for q in layers.values():  # this block in floating point
            q.quant_enabled = False
        try:
            return job.observe(job.names, self.stage.truncation.num_images)
        finally:
            for q in layers.values():
                q.quant_enabled = True

    @torch.no_grad()
    def init_layer(self, q: QuantLinear, stats: LayerStats, samples: Optional[Tensor]) -> None:
        t = self.stage.truncation
        q.set_smoothing(smoothing_scale(stats.channel_absmax, q.weight, self.stage.smoothing.alpha))
        self.set_weight_scale(q, lambda rows, bits: weight_scale_search(rows, bits, t.p, t.grid))
        a = q.a_quant
        if a is not None and a.granularity != "token_dynamic":
            a.set_range(*activation_range_search(q.smoothed_input(samples), a.bits, t.p, t.grid,
                                                 per_token=a.granularity == "token_static"))


def fold_smoothing(job: BlockJob, frozen: Dict[str, nn.Module]) -> Dict[str, str]:
    """Fold explicit smoothing scales into the preceding operation where the family says it is
    exact; returns {layer: what absorbed it}."""
    where = {}
    for fold in job.family.smoothing_folds(job.block):
        q = frozen.get(fold.layer)
        if q is None or q.smooth_scale is None:
            continue
        try:
            into = job.block.get_submodule(fold.into)
        except AttributeError:
            continue
        if not _absorb(into, fold.rows, q.smooth_scale):
            continue
        q.smooth_scale = None
        where[fold.layer] = fold.into
    return where


def _absorb(into: nn.Module, rows, s: Tensor) -> bool:
    if rows is None:  # a norm: its whole output is the layer's input
        into.weight.data /= s
        if getattr(into, "bias", None) is not None:
            into.bias.data /= s
        return True
    if getattr(into, "bias", None) is not None:
        return False  # the bias rows would need the scale too; keep it explicit
    if isinstance(into, RuntimeLayer):
        return into.absorb_output_scale(rows, s)
    if isinstance(into, nn.Linear):
        into.weight.data[rows[0]:rows[1]] /= s[:, None]
        return True
    return False


__all__ = ["UniformMethod", "SmoothingMethod", "TruncatingMethod", "LayerReport", "fold_smoothing"]

"""Vector quantization of a Vim, block by block (ViM-VQ and the k-means baseline).

For each block, in order:

1. the floating-point block runs on the floating-point inputs: its output is the target;
2. its target linear layers become :class:`~vmq.vq.convex.ConvexVQLinear` with k-means
   codebooks (importance: the input second moment from the calibration stats); with quantized
   activations, their per-token static ranges come from a truncation search on the inputs the
   quantized model feeds the block, as in PTQ;
3. ViM-VQ only: the staged convex-combination search (:func:`vmq.vq.incremental.search_block`);
4. the layers are frozen to :class:`~vmq.vq.qlinear.VQLinear` (fp16 codebooks) and each
   layer's output SNR against its floating-point output is measured;
5. the quantized block runs on the quantized inputs, giving the next block's inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from vmq.calib import CalibStats, blockwise, check_stats_cover, observe_inputs
from vmq.errors import VmqError
from vmq.evaluate import snr_db
from vmq.quant.jlss import LOSSES, block_loss
from vmq.quant.ptq import resolve_targets, set_module
from vmq.quant.recipe import Truncation
from vmq.quant.truncation import activation_range_search
from vmq.vq.codebook import Layout, init_codebook
from vmq.vq.convex import ConvexVQLinear
from vmq.vq.incremental import search_block
from vmq.vq.recipe import VQStage

SNR_IMAGES = 32
TRUNCATION = Truncation()  # the PTQ recipe's default truncation search, for A8 ranges


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


def check_model(model: nn.Module, stage: VQStage) -> List[str]:
    """The target layers; fails (before any work) when a target's codebook cannot fit its sub-vectors."""
    targets = resolve_targets(model, stage, key="vq")
    modules = dict(model.named_modules())
    for t in targets:
        lay = Layout.of(modules[t].weight, stage.codebook)
        smallest = min(sl.stop - sl.start for _, sl in lay.group_slices())
        if stage.codebook.size > smallest:
            raise VmqError(f"{t}: codebook.size {stage.codebook.size} exceeds its {smallest} sub-vectors of dim "
                           f"{stage.codebook.dim} (weight {tuple(modules[t].weight.shape)}"
                           + (f", {lay.rows_per_group} rows per group" if lay.groups > 1 else "")
                           + "); use a smaller codebook or more rows per group")
    return targets


def vq_model(model: nn.Module, stage: VQStage, images: Tensor, stats: CalibStats, batch_size: int = 32,
             seed: int = 0, train_scan: Optional[Callable] = None,
             on_block: Optional[Callable[[int, int, str], None]] = None) -> List[VQLayerReport]:
    """Vector-quantize ``model`` in place (target layers become :class:`VQLinear`); per-layer reports."""
    targets = check_model(model, stage)
    acts = stage.input_activations
    check_stats_cover(model, targets, stats, acts is not None and acts.strategy == "token_static")
    torch.manual_seed(seed)
    reports: List[VQLayerReport] = []

    def fit(i, block, prefix, names, q_io, fp_out):
        reports.extend(_vq_block(block, prefix, names, stage, stats, q_io, fp_out[0], model.cfg.num_tokens,
                                 batch_size, seed + i))

    blockwise(model, images, targets, fit, batch_size, train_scan, on_block, what="vector-quantized")
    return reports


def _vq_block(block: nn.Module, prefix: str, names: List[str], stage: VQStage, stats: CalibStats, q_io,
              target: Tensor, num_tokens: int, batch_size: int, seed: int) -> List[VQLayerReport]:
    start = time.perf_counter()
    layers: Dict[str, ConvexVQLinear] = {}
    for j, name in enumerate(names):
        lin = block.get_submodule(name)
        h = stats.layers[prefix + name].second_moment if stage.kmeans.importance else None
        layout, codebook, codes, scale, imp = init_codebook(prefix + name, lin.weight, stage.codebook,
                                                            stage.kmeans.iterations, h, seed * 1000 + j)
        layers[name] = ConvexVQLinear(lin, layout, codebook, codes, scale, imp, stage.input_activations,
                                      num_tokens)
        set_module(block, name, layers[name])
    if stage.input_activations is not None:
        _init_activation_ranges(block, prefix, layers, q_io, batch_size)

    before = None
    if stage.learns:
        before = search_block(block, q_io, target, layers, stage.search, stage.confirm.schedule, seed)
    seconds = time.perf_counter() - start

    frozen = {name: q.freeze() for name, q in layers.items()}
    for name, f in frozen.items():
        set_module(block, name, f)
    losses = (before, None if before is None else
              block_loss(block, q_io, target, LOSSES[stage.search.loss], stage.search.batch_size))
    seen = observe_inputs(block, names, q_io, SNR_IMAGES, batch_size, prefix)
    total_weights = sum(f.out_features * f.in_features for f in frozen.values())
    reports = []
    with torch.no_grad():
        for name in names:
            f = frozen[name]
            x = seen[name]
            bits = f.storage_bits()
            reports.append(VQLayerReport(
                prefix + name, f.dim, f.size, f.weight_codebook.shape[0], bits["weights"],
                round(bits["codes"] / bits["weights"], 4),
                round((bits["codes"] + bits["codebook"] + bits["scale"]) / bits["weights"], 4),
                f.a_bits, round(snr_db(layers[name].float_forward(x), f(x)), 3),
                round(seconds * bits["weights"] / total_weights, 3),
                None if losses[0] is None else round(losses[0], 6),
                None if losses[1] is None else round(losses[1], 6)))
    return reports


@torch.no_grad()
def _init_activation_ranges(block: nn.Module, prefix: str, layers: Dict[str, ConvexVQLinear], q_io,
                            batch_size: int) -> None:
    """Static activation ranges by truncation search on the inputs each layer sees when the
    quantized blocks before feed this one (its own weights already k-means VQ)."""
    saved = {name: q.a_quant for name, q in layers.items()}
    try:
        for q in layers.values():
            q.a_quant = None
        seen = observe_inputs(block, list(layers), q_io, TRUNCATION.num_images, batch_size, prefix)
    finally:
        for name, q in layers.items():
            q.a_quant = saved[name]
    for name, q in layers.items():
        a = q.a_quant
        lo, hi = activation_range_search(seen[name], a.bits, TRUNCATION.p, TRUNCATION.grid,
                                         per_token=a.granularity == "token_static")
        a.set_range(lo, hi)


__all__ = ["vq_model", "check_model", "VQLayerReport"]

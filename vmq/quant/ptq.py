"""Post-training quantization of a Vim, block by block (PTQ4VM and its baselines).

For each block, in order:

1. the floating-point block runs on the floating-point inputs: its output is the target;
2. its target linear layers become :class:`~vmq.quant.qlinear.QuantLinear`: smoothing scales
   from the calibration stats, weight step sizes by truncation search (or min-max), activation
   ranges by truncation search on the inputs the quantized model actually feeds this block (or
   min-max from the stats);
3. PTQ4VM only: JLSS learns smoothing and step sizes against the target;
4. the layers are frozen to integer :class:`~vmq.quant.qlinear.QuantizedLinear`, each layer's
   output SNR against its floating-point output is measured, and smoothing is folded into the
   preceding operation where the arithmetic is exact (in_proj's into the block's norm, dt_proj's
   into x_proj's dt rows);
5. the quantized block runs on the quantized inputs, giving the next block's inputs.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from vmq.calib import CalibStats, blockwise, check_stats_cover, observe_inputs, run_block
from vmq.errors import VmqError
from vmq.evaluate import snr_db
from vmq.quant.jlss import learn_block
from vmq.quant.qlinear import QuantizedLinear, QuantLinear
from vmq.quant.quantizers import weight_qmax
from vmq.quant.recipe import QuantizationStage
from vmq.quant.smooth import smoothing_scale
from vmq.quant.truncation import activation_range_search, weight_scale_search

SNR_IMAGES = 32


@dataclass
class LayerReport:
    name: str
    w_bits: int
    w_strategy: str
    a_bits: Optional[int]
    a_strategy: Optional[str]
    smoothing: str  # "none", "explicit" or "folded into <module>"
    snr_db: float
    jlss_loss_before: Optional[float] = None  # of the block, repeated on each of its layers
    jlss_loss_after: Optional[float] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["snr_db"]):  # an exact layer; JSON has no infinity
            d["snr_db"] = None
        return d


def _matches(name: str, patterns: List[str]) -> bool:
    return any(p == name or (p.startswith("re:") and re.search(p[3:], name)) for p in patterns)


def resolve_targets(model: nn.Module, stage, key: str = "quantization") -> List[str]:
    """Names of the linear layers to quantize: matched by ``stage.targets``, not by ``stage.ignore``.

    ``key`` is the recipe block the errors name (``quantization`` or ``vq``).
    """
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    for field, patterns in (("targets", stage.targets), ("ignore", stage.ignore)):
        for p in patterns:
            if not p.startswith("re:") and p not in modules:
                raise VmqError(f"{key}.{field}: the model has no layer named {p!r}")
            if field == "targets" and not p.startswith("re:") and p not in linears:
                raise VmqError(f"{key}.targets: {p!r} is a {type(modules[p]).__name__}, not a linear layer")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, stage.targets)
             and not _matches(n, stage.ignore)]
    outside = [n for n in names if not re.match(r"layers\.\d+\.", n)]
    if outside:
        raise VmqError(f"{key}.targets: only linear layers inside blocks can be quantized, not {outside[0]!r}")
    if not names:
        raise VmqError(f"{key}.targets match no linear layer of the model (after ignore)")
    return names


def set_module(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, child)


@torch.no_grad()
def _init_layer(q: QuantLinear, stage: QuantizationStage, stats, samples: Optional[Tensor]) -> None:
    if stage.smooths:
        q.set_smoothing(smoothing_scale(stats.channel_absmax, q.weight, stage.smoothing.alpha))
    w = q.smoothed_weight()
    per_channel = q.w_quant.strategy == "channel"
    w_rows = w if per_channel else w.reshape(1, -1)
    if stage.truncates:
        scale = weight_scale_search(w_rows, q.w_bits, stage.truncation.p, stage.truncation.grid)
    else:
        scale = w_rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / weight_qmax(q.w_bits)
    q.w_quant.scale.copy_(scale)
    a = q.a_quant
    if a is None or a.granularity == "token_dynamic":
        return
    per_token = a.granularity == "token_static"
    if stage.truncates:
        lo, hi = activation_range_search(q.smoothed_input(samples), a.bits, stage.truncation.p,
                                         stage.truncation.grid, per_token=per_token)
    else:
        lo, hi = stats.ranges(q.smooth if q.smoothing else None, per_token=per_token)
    a.set_range(lo, hi)


def _fold_smoothing(block: nn.Module, frozen: Dict[str, QuantizedLinear], dt_rank: int) -> Dict[str, str]:
    """Fold explicit smoothing into the preceding operation where exact; returns {layer: where}."""
    where = {}
    mixer = block.mixer
    q = frozen.get("mixer.in_proj")
    if q is not None and q.smooth_scale is not None:
        s = q.smooth_scale
        block.norm.weight.data /= s
        if getattr(block.norm, "bias", None) is not None:
            block.norm.bias.data /= s
        q.smooth_scale = None
        where["mixer.in_proj"] = "norm"
    for up_name, dt_name in (("x_proj", "dt_proj"), ("x_proj_b", "dt_proj_b")):
        q = frozen.get(f"mixer.{dt_name}")
        up = getattr(mixer, up_name, None)
        if q is None or q.smooth_scale is None or up is None:
            continue
        s = q.smooth_scale
        if getattr(up, "bias", None) is not None:
            continue  # the bias rows would need the scale too; keep it explicit
        if isinstance(up, QuantizedLinear) and up.w_strategy == "channel":
            # the dt rows' per-channel step sizes absorb 1/s; the stored integers do not change
            up.weight_scale[:dt_rank] /= s
        elif isinstance(up, nn.Linear):
            up.weight.data[:dt_rank] /= s[:, None]
        else:
            continue
        q.smooth_scale = None
        where[f"mixer.{dt_name}"] = f"mixer.{up_name}"
    return where


def quantize_model(model: nn.Module, stage: QuantizationStage, images: Tensor, stats: CalibStats,
                   batch_size: int = 32, seed: int = 0, train_scan: Optional[Callable] = None,
                   on_block: Optional[Callable[[int, int, str], None]] = None,
                   fake_layers: Optional[Dict[str, QuantLinear]] = None) -> List[LayerReport]:
    """Quantize ``model`` in place (its target layers become :class:`QuantizedLinear`); per-layer reports.

    ``train_scan`` is a differentiable one-direction scan used while learning and calibrating
    (the reference loop when None); the model's own scan is restored afterwards. When
    ``fake_layers`` is a dict, it receives a copy of every fake-quant layer as it was frozen
    (to hold the fake-quant and integer paths together in tests).
    """
    targets = resolve_targets(model, stage)
    acts = stage.scheme.input_activations
    check_stats_cover(model, targets, stats, acts is not None and acts.strategy == "token_static")
    torch.manual_seed(seed)
    reports: List[LayerReport] = []

    def fit(i, block, prefix, names, q_io, fp_out):
        target = fp_out[0]
        if stage.learns and stage.jlss.target == "quant_input":  # this block on the quantized inputs
            target = run_block(block, q_io, batch_size)[0]
        reports.extend(_quantize_block(block, prefix, names, stage, stats, q_io, target, model.cfg, batch_size,
                                       seed + i, fake_layers))

    blockwise(model, images, targets, fit, batch_size, train_scan, on_block, what="quantized")
    return reports


def _quantize_block(block: nn.Module, prefix: str, names: List[str], stage: QuantizationStage, stats: CalibStats,
                    q_io, target: Tensor, cfg, batch_size: int, seed: int,
                    fake_layers: Optional[Dict[str, QuantLinear]] = None) -> List[LayerReport]:
    scheme = stage.scheme
    acts = scheme.input_activations
    layers: Dict[str, QuantLinear] = {}
    for name in names:
        lin = block.get_submodule(name)
        layers[name] = QuantLinear(lin, scheme.weights.num_bits, acts.num_bits if acts else None,
                                   acts.strategy if acts else "token_static", cfg.num_tokens,
                                   w_strategy=scheme.weights.strategy)
        set_module(block, name, layers[name])

    samples: Dict[str, Tensor] = {}
    if stage.truncates:  # observe what the quantized blocks before feed these layers, this block in float
        for q in layers.values():
            q.quant_enabled = False
        try:
            samples = observe_inputs(block, names, q_io, stage.truncation.num_images, batch_size, prefix)
        finally:
            for q in layers.values():
                q.quant_enabled = True
    for name, q in layers.items():
        _init_layer(q, stage, stats.layers[prefix + name], samples.get(name))
    samples.clear()

    losses = (None, None)
    if stage.learns:
        losses = learn_block(block, q_io, target, layers, stage.jlss, seed)

    if fake_layers is not None:
        fake_layers.update({prefix + name: copy.deepcopy(q) for name, q in layers.items()})
    frozen = {name: q.freeze() for name, q in layers.items()}
    for name, f in frozen.items():
        set_module(block, name, f)
    # output SNR of each layer against its floating-point output, on what the quantized model feeds it
    seen = observe_inputs(block, names, q_io, SNR_IMAGES, batch_size, prefix)
    with torch.no_grad():
        snrs = {name: snr_db(layers[name].float_forward(x), frozen[name](x)) for name, x in seen.items()}
    folded = _fold_smoothing(block, frozen, cfg.resolved_dt_rank)

    reports = []
    for name in names:
        f = frozen[name]
        smoothing = (f"folded into {prefix}{folded[name]}" if name in folded
                     else "explicit" if f.smooth_scale is not None else "none")
        reports.append(LayerReport(prefix + name, f.w_bits, f.w_strategy, f.a_bits, f.a_strategy, smoothing,
                                   round(snrs[name], 3),
                                   None if losses[0] is None else round(losses[0], 6),
                                   None if losses[1] is None else round(losses[1], 6)))
    return reports


__all__ = ["quantize_model", "resolve_targets", "LayerReport", "snr_db"]

"""JLSS: Joint Learning of Smoothing scales and Step sizes, for one block (PTQ4VM, Cho et al. 2025).

The block's fake-quant layers learn, together, their per-channel smoothing scales (as ``log s``),
weight step sizes and activation step sizes, so that the quantized block's output follows a
target: the floating-point block's output on floating-point inputs (the block then learns to
compensate the error of the blocks quantized before it) or on the quantized inputs. AdamW, with
straight-through rounding and LSQ's gradient scale on the step sizes (active in training mode,
see :mod:`vmq.quant.quantizers`), gradient clipping, step sizes kept positive.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from vmq.distributed import Part
from vmq.models.family import BlockIO, ModelFamily
from vmq.optimise import LOSSES, BlockTrainer, block_loss
from vmq.quant.qlinear import QuantLinear
from vmq.quant.recipe import JLSS


def learn_block(family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor,
                layers: Dict[str, QuantLinear], cfg: JLSS, seed: int = 0,
                part: Optional[Part] = None) -> Tuple[float, float]:
    """Optimise the quantization parameters of ``layers`` (inside ``block``) in place.

    Returns the loss over all inputs before and after learning. When learning ended above its
    start (too large a step for the block's step sizes, or noise on few images), the starting
    parameters are put back, so a block never leaves JLSS worse on its own objective.
    ``part``: ``inputs`` are this process's shard (torch.distributed); losses and gradients are
    over the whole set (:class:`vmq.optimise.BlockTrainer`), so every process decides alike.
    """
    scales, smooths, act_scales = [], [], []
    for q in layers.values():
        scales.append(q.w_quant.scale)
        if q.a_quant is not None and hasattr(q.a_quant, "scale"):
            scales.append(q.a_quant.scale)
            act_scales.append(q.a_quant.scale)
        if q.smoothing:
            smooths.append(q.log_smooth)
    groups = [{"params": scales, "lr": cfg.lr_scale}]
    if smooths:
        groups.append({"params": smooths, "lr": cfg.lr_smooth})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    loss_fn = LOSSES[cfg.loss]

    before = block_loss(family, block, inputs, target, loss_fn, cfg.batch_size, part)
    start = [p.detach().clone() for p in scales + smooths]
    for q in layers.values():  # LSQ gradient scaling is active in training mode; the rest stays in eval
        q.train()
    try:
        with BlockTrainer(family, block, inputs, target, loss_fn, cfg.batch_size, seed, scales + smooths,
                          part, lambda share: _whole_batch_lsq(act_scales, share)) as trainer:
            for _ in range(cfg.iterations):
                trainer.step(opt, cfg.grad_clip)
                with torch.no_grad():
                    for p in scales:
                        p.clamp_(min=1e-8)
    finally:
        for q in layers.values():
            q.eval()
    after = block_loss(family, block, inputs, target, loss_fn, cfg.batch_size, part)
    if not after <= before:  # (also when the loss became NaN)
        with torch.no_grad():
            for p, p0 in zip(scales + smooths, start):
                p.copy_(p0)
        after = before
    return before, after


def _whole_batch_lsq(act_scales, share: float) -> None:
    """LSQ scales an activation step size's gradient by 1/sqrt(values per step), counted on what
    one forward saw (a unit's share of the batch, :class:`vmq.optimise.BlockTrainer`); rescale it
    to the whole batch's count."""
    for p in act_scales:
        if p.grad is not None:
            p.grad.mul_(math.sqrt(share))


__all__ = ["learn_block"]

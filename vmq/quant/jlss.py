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
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from vmq.activations import ActivationStore
from vmq.distributed import Part
from vmq.errors import VmqError
from vmq.models.family import BlockIO, ModelFamily, io_len, io_slice
from vmq.optimise import LOSSES, WEIGHTED_LOSSES, BlockTrainer, block_loss, holdout_split
from vmq.quant.qlinear import QuantLinear
from vmq.quant.recipe import JLSS


@dataclass
class JLSSResult:
    """A block's JLSS outcome: its loss on the images it learned from and on the held-out ones
    (None without held-out images), before and after; ``steps_kept``: the step whose parameters
    the block keeps (0: its starting parameters)."""

    loss_before: float
    loss_after: float
    holdout_before: Optional[float]
    holdout_after: Optional[float]
    steps_kept: int


def learn_block(family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor,
                layers: Dict[str, QuantLinear], cfg: JLSS, seed: int = 0,
                part: Optional[Part] = None, tail: Optional[Callable[[BlockIO], Tensor]] = None,
                fp_logits: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> JLSSResult:
    """Optimise the quantization parameters of ``layers`` (inside ``block``) in place.

    With ``cfg.holdout`` > 0 the last calibration batches (:func:`vmq.optimise.holdout_split`)
    are held out: learning draws its batches from the others, the held-out loss is measured at
    the start, every ``cfg.check_every`` steps and at the end, and the block keeps the parameters
    with the lowest held-out loss (its starting ones if learning never lowered it: early stopping
    on images learning did not see). What the check measures is ``cfg.select``: ``logits``, the
    relative squared error of the model's logits against ``fp_logits`` (this process's images),
    the block's output taken through ``tail`` (the blocks after it, still floating point, and the
    head), which is what the evaluation's logit SNR measures; or ``block``, the block loss.
    Without held-out images, the block keeps its learned
    parameters unless they ended above the start on the learning images (too large a step, or
    noise on few images). Either way a block never leaves JLSS worse than it started on the loss
    that decides.
    ``weight``: the per-element weights of a loss of :data:`vmq.optimise.WEIGHTED_LOSSES`
    (:func:`logit_weights` for ``logit-weighted``).
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
    params = scales + smooths
    groups = [{"params": scales, "lr": cfg.lr_scale}]
    if smooths:
        groups.append({"params": smooths, "lr": cfg.lr_smooth})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    weighted = cfg.loss in WEIGHTED_LOSSES
    if weighted != (weight is not None):
        raise ValueError(f"JLSS loss {cfg.loss!r} " + ("needs per-element weights" if weighted else "takes no weights"))
    loss_fn = WEIGHTED_LOSSES[cfg.loss] if weighted else LOSSES[cfg.loss]
    part = part if part is not None else Part.whole(io_len(inputs), cfg.batch_size)
    learn = holdout_split(part.total, part.unit, cfg.holdout)
    held = (learn, part.total) if learn < part.total else None

    def loss(items):
        return block_loss(family, block, inputs, target, loss_fn, cfg.batch_size, part, items, weight=weight)

    def check(items):  # on the device: no host sync per check (a GPU run keeps going)
        if cfg.select == "block" or tail is None:
            return block_loss(family, block, inputs, target, loss_fn, cfg.batch_size, part, items, on_device=True,
                              weight=weight)
        return logit_error(family, block, inputs, tail, fp_logits, part, items)

    before = loss((0, learn))
    best = [p.detach().clone() for p in params]  # the start, then the best checked step's
    if held:
        held_before = check(held)
        best_held, kept = held_before.clone(), torch.zeros((), dtype=torch.long, device=held_before.device)
    try:
        with BlockTrainer(family, block, inputs, target, loss_fn, cfg.batch_size, seed, params, part,
                          lambda share: _whole_batch_lsq(act_scales, share), learn_items=learn,
                          weight=weight) as trainer:
            for step in range(1, cfg.iterations + 1):
                for q in layers.values():  # LSQ gradient scaling is active in training mode only
                    q.train()
                trainer.step(opt, cfg.grad_clip)
                with torch.no_grad():
                    for p in scales:
                        p.clamp_(min=1e-8)
                for q in layers.values():
                    q.eval()
                if held and (step % cfg.check_every == 0 or step == cfg.iterations):
                    h = check(held)
                    better = h < best_held  # (never for NaN)
                    with torch.no_grad():
                        for b, p in zip(best, params):
                            b.copy_(torch.where(better, p, b))
                    best_held = torch.where(better, h, best_held)
                    kept = torch.where(better, torch.full_like(kept, step), kept)
    finally:
        for q in layers.values():
            q.eval()
    if held:  # the best checked step's parameters (the last step's when it was the best)
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        after = loss((0, learn))
        kept, held_before, best_held = int(kept.item()), held_before.item(), best_held.item()
    else:  # no held-out images: the end, unless it is worse than the start on the learning images
        after = loss((0, learn))
        held_before = best_held = None
        kept = cfg.iterations if after <= before else 0  # (not after a NaN either)
        if kept == 0:
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
            after = before
    return JLSSResult(before, after, held_before, best_held, kept)


def logit_error(family: ModelFamily, block: nn.Module, inputs: BlockIO, tail: Callable[[BlockIO], Tensor],
                fp_logits: Tensor, part: Part, items: Tuple[int, int]) -> Tensor:
    """sum |z - z_fp|^2 / sum |z_fp|^2 over the samples ``items`` of the whole set (both ends on
    unit boundaries), ``z`` the logits of ``block``'s output through ``tail``: the logit SNR is
    -10 log10 of it. Sums in float64, over processes too; the result stays on the device."""
    sums = torch.zeros(2, dtype=torch.float64, device=fp_logits.device)
    with torch.no_grad():
        for rows in part.unit_rows(*items):
            z, ref = tail(family.run_block(block, io_slice(inputs, rows))).double(), fp_logits[rows].double()
            sums += torch.stack(((z - ref).pow(2).sum(), ref.pow(2).sum()))
    sums = part.dist.sum(sums)
    return sums[0] / sums[1].clamp(min=1e-300)


def logit_weights(family: ModelFamily, outputs: BlockIO, tail: Callable[[BlockIO], Tensor], fp_logits: Tensor,
                  part: Part, store: ActivationStore, probes: int = 16, seed: int = 0) -> Tensor:
    """How much each element of a block's output moves the logits: the diagonal of J^T J, J the
    Jacobian of the logits (``tail``: the later blocks, still floating point, and the head) with
    respect to the block's output, at the floating-point model's ``outputs`` (this process's
    samples), divided by the mean over the whole set of |z_fp|^2. With these weights,
    sum w (out - target)^2 is the first-order estimate of the logits' relative squared error
    (what the logit SNR measures) that a block output ``out`` instead of ``target`` would cause,
    and it still compares the block's whole output (the ``logit-weighted`` JLSS loss).
    One backward pass per class and calibration unit when there are at most ``probes`` classes;
    with more (ImageNet's 1000), ``probes`` passes, each for a random +-1 combination v of the
    classes (drawn on the CPU from ``seed`` and the unit's index: the same on any device and for
    any number of processes), whose mean (J^T v)^2 is an unbiased estimate of the diagonal.
    Kept where ``store`` places activations."""
    if family.block_output(outputs) is not outputs[0]:
        raise VmqError("the logit-weighted loss needs a family whose block output is the first tensor of its I/O")
    energy = (part.dist.sum(fp_logits.double().pow(2).sum()) / part.total).float()
    classes = fp_logits.shape[-1]
    gen = torch.Generator(device="cpu")

    def units():
        for rows in part.unit_rows(0, part.total):
            io = io_slice(outputs, rows)
            h = io[0].detach().requires_grad_(True)
            if classes <= probes:  # the classes one by one: exact
                dirs = torch.eye(classes, device=h.device)
            else:  # random +-1 combinations, E[(J^T v)^2] = diag(J^T J); drawn per calibration batch
                gen.manual_seed(seed * 1_000_003 + (part.start + rows.start) // part.unit)  # (any process count)
                signs = torch.randint(0, 2, (probes, classes), generator=gen, device=gen.device)
                dirs = signs.to(h.device, torch.float32).mul_(2).sub_(1)
            with torch.enable_grad():
                z = tail((h,) + tuple(io[1:]))
                w = torch.zeros_like(h)
                for k, v in enumerate(dirs):
                    g, = torch.autograd.grad(z @ v, h, grad_outputs=torch.ones(z.shape[0], device=h.device),
                                             retain_graph=k + 1 < len(dirs))
                    w += g.pow(2)
            yield (w.div_(energy if classes <= probes else energy * len(dirs)),)

    return store.collect(units(), io_len(outputs))[0]


def _whole_batch_lsq(act_scales, share: float) -> None:
    """LSQ scales an activation step size's gradient by 1/sqrt(values per step), counted on what
    one forward saw (a unit's share of the batch, :class:`vmq.optimise.BlockTrainer`); rescale it
    to the whole batch's count."""
    for p in act_scales:
        if p.grad is not None:
            p.grad.mul_(math.sqrt(share))


__all__ = ["JLSSResult", "learn_block", "logit_error", "logit_weights"]

"""Incremental codeword confirmation: the staged search of one block (ViM-VQ, vmq's version).

The block's VQ layers start soft (:meth:`ConvexVQLinear.start_search`). The search's iterations
are split evenly over the stages of ``confirm.schedule`` plus one; each stage optimises the
combination logits and the codebooks against the block-output loss, then confirms, in every
layer, the most confident soft sub-vectors until the stage's cumulative fraction of them is
fixed. After the last stage (fraction 1.0) every sub-vector is a single codeword, and the last
share of iterations tunes the codebooks alone with these codes.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from vmq.quant.jlss import LOSSES, batch_indices, block_loss
from vmq.vq.convex import ConvexVQLinear, learnable
from vmq.vq.recipe import Search


def stage_lengths(iterations: int, stages: int) -> List[int]:
    """``iterations`` split over ``stages`` as evenly as possible, earlier stages taking the remainder."""
    base, extra = divmod(iterations, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def confirm(layers: Dict[str, ConvexVQLinear], fraction: float) -> None:
    """In every layer, fix the most confident soft sub-vectors until ``fraction`` of all are fixed."""
    for q in layers.values():
        n = q.layout.num_subvectors
        need = min(n, math.ceil(fraction * n - 1e-9)) - int(q.confirmed.sum())
        if need <= 0:
            continue
        conf = q.confidence().masked_fill(q.confirmed, -1.0)
        q.confirm_indices(torch.topk(conf, need).indices)


def search_block(block: nn.Module, inputs: Tuple[Tensor, Optional[Tensor]], target: Tensor,
                 layers: Dict[str, ConvexVQLinear], cfg: Search, schedule: List[float],
                 seed: int = 0) -> float:
    """Run the staged search in place; returns the block loss with the k-means codes (before it)."""
    loss_fn = LOSSES[cfg.loss]
    before = block_loss(block, inputs, target, loss_fn, cfg.batch_size)
    for q in layers.values():
        q.start_search(cfg.candidates)
    logits, codebooks = learnable(layers)
    hidden, residual = inputs
    n = hidden.shape[0]
    batches = batch_indices(n, cfg.batch_size, torch.Generator().manual_seed(seed))
    saved = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in logits + codebooks:
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": logits, "lr": cfg.lr_logits},
                                {"params": codebooks, "lr": cfg.lr_codebook}])
        lengths = stage_lengths(cfg.iterations, len(schedule) + 1)
        with torch.enable_grad():
            for stage, steps in enumerate(lengths):
                for _ in range(steps):
                    idx = next(batches)
                    out, _ = block(hidden[idx], None if residual is None else residual[idx])
                    loss = loss_fn(out, target[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if stage < len(schedule):
                    confirm(layers, schedule[stage])
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for p in logits + codebooks:
            p.requires_grad_(False)
    return before


__all__ = ["search_block", "confirm", "stage_lengths"]

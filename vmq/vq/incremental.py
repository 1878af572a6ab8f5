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
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from vmq.distributed import Part
from vmq.models.family import BlockIO, ModelFamily
from vmq.optimise import LOSSES, BlockTrainer, block_loss
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


def search_block(family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor,
                 layers: Dict[str, ConvexVQLinear], cfg: Search, schedule: List[float], seed: int = 0,
                 part: Optional[Part] = None) -> float:
    """Run the staged search in place; returns the block loss with the k-means codes (before it).

    ``part``: ``inputs`` are this process's shard (torch.distributed); the loss and the gradients
    are over the whole set (:class:`vmq.optimise.BlockTrainer`)."""
    loss_fn = LOSSES[cfg.loss]
    before = block_loss(family, block, inputs, target, loss_fn, cfg.batch_size, part)
    for q in layers.values():
        q.start_search(cfg.candidates)
    logits, codebooks = learnable(layers)
    with BlockTrainer(family, block, inputs, target, loss_fn, cfg.batch_size, seed, logits + codebooks,
                     part) as trainer:
        opt = torch.optim.Adam([{"params": logits, "lr": cfg.lr_logits},
                                {"params": codebooks, "lr": cfg.lr_codebook}])
        for stage, steps in enumerate(stage_lengths(cfg.iterations, len(schedule) + 1)):
            for _ in range(steps):
                trainer.step(opt)
            if stage < len(schedule):
                confirm(layers, schedule[stage])
    return before


__all__ = ["search_block", "confirm", "stage_lengths"]

"""JLSS: Joint Learning of Smoothing scales and Step sizes, for one block (PTQ4VM, Cho et al. 2025).

The block's quantized linear layers learn, together, their per-channel smoothing scales (as
``log s``), weight step sizes and activation step sizes, so that the quantized block's output
follows the floating-point block's output. The block is fed the outputs of the blocks already
quantized before it; the target is the floating-point block's output on floating-point inputs.
Loss: 1 - cosine similarity per token, averaged. Rounding is straight-through, step sizes get
LSQ's gradient scale (see :mod:`vmq.quant.quantizers`).
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.quant.qlinear import QuantLinear
from vmq.quant.recipe import JLSS


def cosine_loss(out: Tensor, target: Tensor) -> Tensor:
    return (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()


def relative_mse(out: Tensor, target: Tensor) -> Tensor:
    """|out - target|^2 / |target|^2 per token, averaged (unlike the cosine, it sees magnitude)."""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)).mean()


LOSSES = {
    "cosine": cosine_loss,
    "mse": relative_mse,
    "cosine+mse": lambda out, target: cosine_loss(out, target) + relative_mse(out, target),
}


def block_loss(block: nn.Module, inputs: Tuple[Tensor, Optional[Tensor]], target: Tensor, loss_fn,
               batch_size: int) -> float:
    """``loss_fn`` of ``block``'s output on all ``inputs`` against ``target``, averaged over samples."""
    hidden, residual = inputs
    total = 0.0
    with torch.no_grad():
        for i in range(0, hidden.shape[0], batch_size):
            r = None if residual is None else residual[i:i + batch_size]
            out, _ = block(hidden[i:i + batch_size], r)
            total += loss_fn(out, target[i:i + batch_size]).item() * out.shape[0]
    return total / hidden.shape[0]


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of sample indices: a random order, walked in steps, reshuffled when a batch
    would run past its end."""
    order, pos = torch.randperm(n, generator=generator), 0
    while True:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def learn_block(block: nn.Module, inputs: Tuple[Tensor, Optional[Tensor]], target: Tensor,
                layers: Dict[str, QuantLinear], cfg: JLSS, seed: int = 0) -> Tuple[float, float]:
    """Optimise the quantization parameters of ``layers`` (inside ``block``) in place.

    Returns the loss over all inputs before and after learning.
    """
    hidden, residual = inputs
    scales, smooths = [], []
    for q in layers.values():
        scales.append(q.w_quant.scale)
        if q.a_quant is not None and hasattr(q.a_quant, "scale"):
            scales.append(q.a_quant.scale)
        if q.smoothing:
            smooths.append(q.log_smooth)
    params = scales + smooths
    groups = [{"params": scales, "lr": cfg.lr_scale}]
    if smooths:
        groups.append({"params": smooths, "lr": cfg.lr_smooth})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = LOSSES[cfg.loss]

    before = block_loss(block, inputs, target, loss_fn, cfg.batch_size)
    with torch.enable_grad():
        _optimise(block, hidden, residual, target, layers, params, scales, opt, gen, cfg, loss_fn)
    return before, block_loss(block, inputs, target, loss_fn, cfg.batch_size)


def _optimise(block, hidden, residual, target, layers, params, scales, opt, gen, cfg, loss_fn) -> None:
    n = hidden.shape[0]
    saved = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for q in layers.values():  # LSQ gradient scaling is active in training mode; the rest stays in eval
        q.train()
    batches = batch_indices(n, cfg.batch_size, gen)
    try:
        for _ in range(cfg.iterations):
            idx = next(batches)
            out, _ = block(hidden[idx], None if residual is None else residual[idx])
            loss = loss_fn(out, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                for p in scales:
                    p.clamp_(min=1e-8)
    finally:
        for q in layers.values():
            q.eval()
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)

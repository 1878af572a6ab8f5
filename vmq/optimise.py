"""The loop that learns some parameters of one block against a target output (JLSS, the VQ search).

Both PTQ4VM's JLSS and ViM-VQ's codeword search optimise a few parameters of one block (step
sizes and smoothing scales; combination logits and codebooks) so that the block's output on the
calibration inputs follows a target, in steps over random batches of the inputs.
:class:`BlockTrainer` is that loop; :data:`LOSSES` the block-output losses; :func:`block_loss`
the loss over all inputs, before and after.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.distributed import Part
from vmq.models.family import BlockIO, ModelFamily, io_batches, io_len, io_slice

Loss = Callable[[Tensor, Tensor], Tensor]


def cosine_loss(out: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity per token, averaged (PTQ4VM's block loss)."""
    return (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()


def relative_mse(out: Tensor, target: Tensor) -> Tensor:
    """|out - target|^2 / |target|^2 per token, averaged (unlike the cosine, it sees magnitude)."""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)).mean()


LOSSES = {
    "cosine": cosine_loss,
    "mse": relative_mse,
    "cosine+mse": lambda out, target: cosine_loss(out, target) + relative_mse(out, target),
}


def block_loss(family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor, loss_fn: Loss,
               batch_size: int, part: Optional[Part] = None) -> float:
    """``loss_fn`` of ``block``'s output on all ``inputs`` against ``target``, averaged over samples.

    The sum stays on the device (in float64) until the end: one host sync, not one per batch.
    With ``part`` (``inputs`` are a process's shard of a set of ``part.total`` samples) the sums
    of all processes are added: every process gets the loss over the whole set."""
    total, offset = torch.zeros((), dtype=torch.float64, device=target.device), 0
    with torch.no_grad():
        for chunk in io_batches(inputs, batch_size):
            out = family.block_output(family.run_block(block, chunk))
            n = out.shape[0]
            total += loss_fn(out, target[offset:offset + n]).double() * n
            offset += n
    if part is not None and part.dist.active:
        return part.dist.sum(total).item() / part.total
    return total.item() / io_len(inputs)


def batch_indices(n: int, batch_size: int, generator: torch.Generator,
                  device: Union[str, torch.device] = "cpu") -> Iterator[Tensor]:
    """Endless batches of sample indices on ``device``: a random order, walked in steps, reshuffled
    when a batch would run past its end.

    The orders are drawn on the CPU (``generator`` is a CPU generator), so the batches are the same
    on every device; each order is copied to ``device`` once (to a GPU from pinned memory, without
    waiting for it), not each batch."""
    cuda = torch.device(device).type == "cuda"

    def shuffled() -> Tensor:
        order = torch.randperm(n, generator=generator, device="cpu")
        return order.pin_memory().to(device, non_blocking=True) if cuda else order

    order, pos = shuffled(), 0
    while True:
        if pos + batch_size > n:
            order, pos = shuffled(), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


class BlockTrainer:
    """Steps of an optimiser on ``params`` of ``block``, each on a random batch of ``inputs``.

    Inside the ``with`` block only ``params`` require gradients; the block's own flags are
    restored afterwards (and ``params`` left without gradients). Batches come from a local CPU
    generator seeded with ``seed``, so a run does not depend on global random state, and a run on
    a GPU takes the same batches as one on the CPU.

    With ``part`` (``inputs`` are this process's shard of ``part.total`` samples, under
    torch.distributed) every process draws the same global batch, computes the loss on the
    samples of it that it holds, scaled by their share of the batch, and the gradients are summed
    over processes before clipping and the step: the gradient of the whole batch's mean loss, as
    in one process up to summation order; every process takes the same step. ``on_share(share)``
    is called after a process's backward with its share of the batch (local / global samples),
    for gradients whose scale depends on the batch size (LSQ's step-size gradient scale).
    """

    def __init__(self, family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor, loss_fn: Loss,
                 batch_size: int, seed: int, params: List[Tensor], part: Optional[Part] = None,
                 on_share: Optional[Callable[[float], None]] = None):
        self.family, self.block, self.inputs, self.target = family, block, inputs, target
        self.loss_fn, self.params, self.on_share = loss_fn, params, on_share
        self.part = part if part is not None and part.dist.active else None
        n = io_len(inputs) if self.part is None else self.part.total
        self.batches = batch_indices(n, batch_size, torch.Generator(device="cpu").manual_seed(seed),
                                     target.device if self.part is None else "cpu")
        self._saved = {}

    def __enter__(self) -> "BlockTrainer":
        self._saved = {p: p.requires_grad for p in self.block.parameters()}
        for p in self.block.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def step(self, opt: torch.optim.Optimizer, grad_clip: Optional[float] = None) -> None:
        idx = next(self.batches)
        with torch.enable_grad():
            if self.part is None:
                out = self.family.block_output(self.family.run_block(self.block, io_slice(self.inputs, idx)))
                loss = self.loss_fn(out, self.target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                self._shard_backward(opt, idx)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
            opt.step()

    def _shard_backward(self, opt: torch.optim.Optimizer, idx: Tensor) -> None:
        """This process's share of the batch ``idx`` (global, CPU), then the sum over processes."""
        local = self.part.local(idx).to(self.target.device)
        opt.zero_grad(set_to_none=True)
        if local.numel():
            out = self.family.block_output(self.family.run_block(self.block, io_slice(self.inputs, local)))
            (self.loss_fn(out, self.target[local]) * (local.numel() / idx.numel())).backward()
            if self.on_share is not None:
                self.on_share(local.numel() / idx.numel())
        self.part.dist.sum_grads(self.params)

    def __exit__(self, *exc) -> None:
        for p, flag in self._saved.items():
            p.requires_grad_(flag)
        for p in self.params:
            p.requires_grad_(False)


__all__ = ["LOSSES", "cosine_loss", "relative_mse", "block_loss", "batch_indices", "BlockTrainer"]

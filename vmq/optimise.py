"""The loop that learns some parameters of one block against a target output (JLSS, the VQ search).

Both PTQ4VM's JLSS and ViM-VQ's codeword search optimise a few parameters of one block (step
sizes and smoothing scales; combination logits and codebooks) so that the block's output on the
calibration inputs follows a target, in steps over random batches of the inputs.
:class:`BlockTrainer` is that loop; :data:`LOSSES` the block-output losses; :func:`block_loss`
the loss over all inputs, before and after.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.distributed import Part
from vmq.models.family import BlockIO, ModelFamily, io_len, io_slice

Loss = Callable[[Tensor, Tensor], Tensor]


def cosine_loss(out: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity per token, averaged (PTQ4VM's block loss)."""
    return (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()


def relative_mse(out: Tensor, target: Tensor) -> Tensor:
    """|out - target|^2 / |target|^2 per token, averaged (unlike the cosine, it sees magnitude)."""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)).mean()


def weighted_squared_error(out: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum weight * (out - target)^2 over each sample's elements, averaged over samples (with
    :func:`vmq.quant.jlss.logit_weights`: the Gauss-Newton estimate of the logits' squared error)."""
    return ((out - target).pow(2) * weight).flatten(1).sum(1).mean()


LOSSES = {
    "cosine": cosine_loss,
    "mse": relative_mse,
    "cosine+mse": lambda out, target: cosine_loss(out, target) + relative_mse(out, target),
}
#: losses that also take a per-element weight (the same shape as the target): ``(out, target, weight)``
WEIGHTED_LOSSES = {"logit-weighted": weighted_squared_error}


def block_loss(family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor, loss_fn: Loss,
               batch_size: int, part: Optional[Part] = None, items: Optional[Tuple[int, int]] = None,
               on_device: bool = False, weight: Optional[Tensor] = None) -> Union[float, Tensor]:
    """``loss_fn`` of ``block``'s output on all ``inputs`` against ``target``, averaged over samples
    (over the samples ``[items[0], items[1])`` of the whole set alone when ``items`` is given; both
    ends on unit boundaries).

    The block runs on one unit of ``part`` at a time (a calibration batch; ``batch_size`` samples
    when ``part`` is None), so each sample's loss is the same whether one process or several
    compute it. The sum stays on the device (in float64) until the end: one host sync, not one per
    unit. With ``part`` (``inputs`` are a process's shard of a set of ``part.total`` samples) the
    sums of all processes are added: every process gets the loss over the whole set.
    ``on_device``: the loss as a float64 tensor on the device, with no host sync at all.
    ``weight``: per-element weights of the target's shape, for a loss of :data:`WEIGHTED_LOSSES`."""
    part = part if part is not None else Part.whole(io_len(inputs), batch_size)
    lo, hi = items if items is not None else (0, part.total)
    total = torch.zeros((), dtype=torch.float64, device=target.device)
    with torch.no_grad():
        for rows in part.unit_rows(lo, hi):
            out = family.block_output(family.run_block(block, io_slice(inputs, rows)))
            total += _loss(loss_fn, out, target, weight, rows).double() * out.shape[0]
    mean = part.dist.sum(total) / (hi - lo)
    return mean if on_device else mean.item()


def _loss(loss_fn: Loss, out: Tensor, target: Tensor, weight: Optional[Tensor], rows) -> Tensor:
    return loss_fn(out, target[rows]) if weight is None else loss_fn(out, target[rows], weight[rows])


def holdout_split(total: int, unit: int, share: float) -> int:
    """How many of ``total`` samples (in units of ``unit``, the last one possibly short) learning
    may use when a ``share`` of them is held out: the held-out samples are the last
    ``round(units x share)`` whole units (at least one when ``share`` > 0 and there are two units
    or more; none with a single unit), so processes, which hold whole units, agree on the split."""
    units = -(-total // unit)
    held = 0 if share <= 0 or units < 2 else min(units - 1, max(1, round(units * share)))
    return min(total, (units - held) * unit)


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[List[int]]:
    """Endless batches of sample indices, as sorted host integers: a random order drawn with a
    ``random.Random(seed)``, walked in steps and reshuffled when a batch would run past its end.
    No tensor is involved, so the batches are the same whatever device computes and drawing one
    never waits for a device."""
    rng, order, pos = random.Random(seed), list(range(n)), n
    while True:
        if pos + batch_size > n:
            rng.shuffle(order)
            pos = 0
        yield sorted(order[pos:pos + batch_size])
        pos += batch_size


class BlockTrainer:
    """Steps of an optimiser on ``params`` of ``block``, each on a random batch of ``inputs``.

    Inside the ``with`` block only ``params`` require gradients; the block's own flags are
    restored afterwards (and ``params`` left without gradients). Batches come from
    :func:`batch_indices` (a ``random.Random(seed)`` of its own), so a run does not depend on
    global random state, and a run on a GPU takes the same batches as one on the CPU.

    A step's gradient is that of the batch's mean loss, computed the same way in one process and
    in many: the batch is split by the units of ``part`` (calibration batches, which processes
    hold whole; ``batch_size`` samples when ``part`` is None), the block runs forward and backward
    on each unit's share in turn, and the unit gradients are added in unit order in float64, over
    processes too (torch.distributed). Each sample's arithmetic therefore does not depend on how
    many processes share the work, nor does the sum (float64 sums of a few float32 gradients are
    exact, or off in the 16th digit), and every process takes the same step as one process would.
    ``on_share(share)`` is called after each unit's backward with its share of the batch (unit
    samples / batch samples), for gradients whose scale depends on the batch size (LSQ's).
    ``learn_items``: batches are drawn from the first ``learn_items`` samples of the whole set
    only (the rest held out, :func:`holdout_split`); default all. ``weight``: per-element weights
    of the target's shape, for a loss of :data:`WEIGHTED_LOSSES`.
    """

    def __init__(self, family: ModelFamily, block: nn.Module, inputs: BlockIO, target: Tensor, loss_fn: Loss,
                 batch_size: int, seed: int, params: List[Tensor], part: Optional[Part] = None,
                 on_share: Optional[Callable[[float], None]] = None, learn_items: Optional[int] = None,
                 weight: Optional[Tensor] = None):
        self.family, self.block, self.inputs, self.target, self.weight = family, block, inputs, target, weight
        self.loss_fn, self.params, self.on_share = loss_fn, params, on_share
        self.part = part if part is not None else Part.whole(io_len(inputs), batch_size)
        n = self.part.total if learn_items is None else learn_items
        self.batches = batch_indices(n, min(batch_size, n), seed)
        self._saved = {}

    def __enter__(self) -> "BlockTrainer":
        self._saved = {p: p.requires_grad for p in self.block.parameters()}
        for p in self.block.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def step(self, opt: torch.optim.Optimizer, grad_clip: Optional[float] = None) -> None:
        sums, seen = self._unit_gradients(opt, next(self.batches))
        flat = torch.cat([s.reshape(-1) for s in sums] + [torch.tensor(seen, dtype=torch.float64,
                                                                       device=self.target.device)])
        if self.part.dist.active:
            flat = self.part.dist.sum(flat)
            seen = [h > 0 for h in flat[-len(self.params):].tolist()]  # one wait per step
        offset = 0
        for p, h in zip(self.params, seen):  # a parameter no unit reached keeps no gradient
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) if h else None
            offset += p.numel()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        opt.step()

    def _unit_gradients(self, opt: torch.optim.Optimizer, idx: List[int]) -> Tuple[List[Tensor], List[bool]]:
        """The float64 sums of the unit gradients of batch ``idx`` (sorted global indices) over
        the units this process holds, in unit order; whether each parameter got a gradient."""
        part, units = self.part, {}
        for i in idx:
            if part.start <= i < part.stop:  # ranks hold whole units
                units.setdefault(i // part.unit, []).append(i - part.start)
        flat = [i for unit in units.values() for i in unit]
        held = torch.tensor(flat, dtype=torch.long, device=torch.device("cpu"))
        if self.target.device.type == "cuda":  # one copy per step, not one per unit
            held = held.pin_memory().to(self.target.device, non_blocking=True)
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        seen = [False] * len(self.params)
        for local in held.split([len(unit) for unit in units.values()]):
            share = local.numel() / len(idx)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = self.family.block_output(self.family.run_block(self.block, io_slice(self.inputs, local)))
                (_loss(self.loss_fn, out, self.target, self.weight, local) * share).backward()
            if self.on_share is not None:
                self.on_share(share)
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    sums[i] += p.grad
                    seen[i] = True
        opt.zero_grad(set_to_none=True)
        return sums, seen

    def __exit__(self, *exc) -> None:
        for p, flag in self._saved.items():
            p.requires_grad_(flag)
        for p in self.params:
            p.requires_grad_(False)


__all__ = ["LOSSES", "WEIGHTED_LOSSES", "cosine_loss", "relative_mse", "weighted_squared_error", "block_loss",
           "holdout_split", "batch_indices", "BlockTrainer"]

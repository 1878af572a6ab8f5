"""Top-1 / top-5 evaluation with JSON-ready results (keys as timm's ``validate.py``)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from vmq.data import EvalBatch
from vmq.distributed import SINGLE, Dist
from vmq.errors import VmqError
from vmq.layers import runtime_layers
from vmq.runtime import ieee_float32


def param_count(model: nn.Module) -> int:
    """Parameters, counting the weights that runtime (quantized) layers store as buffers too."""
    return sum(p.numel() for p in model.parameters()) + sum(m.stored_weights() for _, m in runtime_layers(model))


#: errors of skipped images kept for the report (the count covers them all)
SKIPPED_SHOWN = 10


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, on_batch: Optional[Callable[[int, int], None]] = None,
             keep_logits: bool = False, skip_bad: bool = False, keep_predictions: bool = False,
             dist: Dist = SINGLE) -> Dict[str, Any]:
    """Run ``model`` (in eval mode, where it is) over ``loader``; returns top-1/top-5 (percent), image
    count and images/s. The images go to the model's device; the model is not moved.

    ``loader`` yields :class:`vmq.data.EvalBatch` (:func:`vmq.data.eval_loader`) or (images,
    labels) pairs. An image that could not be read stops the run with an error naming it, or,
    with ``skip_bad``, is left out and counted (``skipped_images``; the first
    :data:`SKIPPED_SHOWN` errors in ``skipped_errors``). Nothing per image is kept unless asked:
    ``keep_logits`` adds ``"logits"`` (N, classes) on the CPU, for :func:`vmq.metrics.agreement`;
    ``keep_predictions`` adds ``"predictions"`` (N,) (the top-1 class) and ``"indices"`` (N,) (each
    image's position in the set). ``on_batch(done, total)`` is called after every batch (for a
    progress bar; skipped images count as done). On CUDA: full fp32
    (:func:`vmq.runtime.ieee_float32`), and the counts and logits stay on the device until the
    end (no wait for the device per batch).

    Under torch.distributed (``dist``) ``loader`` holds this process's shard (possibly empty;
    :func:`vmq.distributed.shard_loader`): the counts (images, hits, skipped images) are summed
    over processes, so every process gets the figures of all the images; the time is the slowest
    process's; ``on_batch``, ``skipped_errors``, ``"logits"`` and ``"predictions"`` are this
    process's own.
    """
    model.eval()
    device = next(model.parameters()).device
    total = len(loader.dataset)
    if dist.sum_int(total) == 0:
        raise VmqError("the evaluation set is empty")
    n = done = skipped = 0
    errors: List[str] = []
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
    finite = torch.ones((), dtype=torch.bool, device=device)
    kept, predicted, positions = [], [], []
    start = time.perf_counter()
    with ieee_float32(device):
        for batch in loader:
            if isinstance(batch, EvalBatch):
                images, target, indices, bad = batch
            else:
                (images, target), indices, bad = batch, None, []
            if bad:
                if not skip_bad:
                    raise VmqError(f"{bad[0]} (--skip-bad skips and counts images that cannot be read)")
                skipped += len(bad)
                errors.extend(bad[:SKIPPED_SHOWN - len(errors)])
            done += target.numel() + len(bad)
            if images is not None and target.numel():
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                logits = model(images)
                finite &= torch.isfinite(logits).all()
                if keep_logits:
                    kept.append(logits.float())
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                hit = top == target[:, None]
                hits += torch.stack((hit[:, 0].sum(), hit.any(dim=-1).sum()))
                if keep_predictions:
                    predicted.append(top[:, 0])
                    positions.append(indices if indices is not None
                                     else torch.arange(n, n + target.numel(), device="cpu"))
                n += target.numel()
            if on_batch:
                on_batch(done, total)
    top1, top5 = hits.tolist()  # waits for the device: the timing below covers all the work
    elapsed = time.perf_counter() - start
    if dist.active:  # every process's counts; the slowest process's time
        counts = torch.tensor([top1, top5, n, skipped, int(not bool(finite))], device="cpu")
        top1, top5, n, skipped, bad = dist.sum(counts).tolist()
        finite, elapsed = bad == 0, dist.max_float(elapsed)
    if n == 0:
        first = f"; the first: {errors[0]}" if errors else ""
        raise VmqError(f"none of the {skipped} images of the evaluation set could be read{first}")
    if not bool(finite):
        raise VmqError("the model produced NaN or Inf logits")
    if keep_logits and not kept:  # an empty shard
        kept.append(torch.empty(0, getattr(model, "num_classes", 0) or 0, device="cpu"))
    extra: Dict[str, Any] = {"logits": torch.cat(kept).cpu()} if keep_logits else {}
    if keep_predictions:
        empty = torch.empty(0, dtype=torch.int64, device="cpu")
        extra.update(predictions=torch.cat(predicted).cpu() if predicted else empty,
                     indices=torch.cat(positions).cpu() if positions else empty)
    return {
        **extra,
        "top1": round(100.0 * top1 / n, 3),
        "top1_err": round(100.0 - 100.0 * top1 / n, 3),
        "top5": round(100.0 * top5 / n, 3),
        "top5_err": round(100.0 - 100.0 * top5 / n, 3),
        "num_images": n,
        "images_per_sec": round(n / elapsed, 2),
        "eval_seconds": round(elapsed, 3),
        "skipped_images": skipped,
        "skipped_errors": errors,
    }

"""Top-1 / top-5 evaluation with JSON-ready results (keys as timm's ``validate.py``)."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from vmq.errors import VmqError
from vmq.layers import runtime_layers
from vmq.runtime import ieee_float32


def param_count(model: nn.Module) -> int:
    """Parameters, counting the weights that runtime (quantized) layers store as buffers too."""
    return sum(p.numel() for p in model.parameters()) + sum(m.stored_weights() for _, m in runtime_layers(model))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, on_batch: Optional[Callable[[int, int], None]] = None,
             keep_logits: bool = False) -> Dict[str, float]:
    """Run ``model`` (in eval mode, where it is) over ``loader``; returns top-1/top-5 (percent), image
    count and images/s. The images go to the model's device; the model is not moved.

    ``on_batch(done, total)`` is called after every batch (for a progress bar). With
    ``keep_logits`` the result also holds ``"logits"`` (N, classes) on the CPU, for
    :func:`vmq.metrics.agreement`. On CUDA: full fp32 (:func:`vmq.runtime.ieee_float32`), and
    the counts and logits stay on the device until the end (no wait for the device per batch).
    """
    model.eval()
    device = next(model.parameters()).device
    total = len(loader.dataset)
    if total == 0:
        raise VmqError("the evaluation set is empty")
    n = 0
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
    finite = torch.ones((), dtype=torch.bool, device=device)
    kept = []
    start = time.perf_counter()
    with ieee_float32(device):
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            logits = model(images)
            finite &= torch.isfinite(logits).all()
            if keep_logits:
                kept.append(logits.float())
            k = min(5, logits.shape[-1])
            hit = logits.topk(k, dim=-1).indices == target[:, None]
            hits += torch.stack((hit[:, 0].sum(), hit.any(dim=-1).sum()))
            n += target.numel()
            if on_batch:
                on_batch(n, total)
    top1, top5 = hits.tolist()  # waits for the device: the timing below covers all the work
    elapsed = time.perf_counter() - start
    if not bool(finite):
        raise VmqError("the model produced NaN or Inf logits")
    extra = {"logits": torch.cat(kept).cpu()} if keep_logits else {}
    return {
        **extra,
        "top1": round(100.0 * top1 / n, 3),
        "top1_err": round(100.0 - 100.0 * top1 / n, 3),
        "top5": round(100.0 * top5 / n, 3),
        "top5_err": round(100.0 - 100.0 * top5 / n, 3),
        "num_images": n,
        "images_per_sec": round(n / elapsed, 2),
        "eval_seconds": round(elapsed, 3),
    }

"""Top-1 / top-5 evaluation with JSON-ready results (keys as timm's ``validate.py``)."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from vmq.errors import VmqError


def param_count(model: nn.Module) -> int:
    """Parameters, counting the stored integer weights of quantized layers too."""
    from vmq.quant.qlinear import QuantizedLinear

    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu",
             on_batch: Optional[Callable[[int, int], None]] = None) -> Dict[str, float]:
    """Run ``model`` over ``loader``; returns top-1/top-5 (percent), image count and images/s.

    ``on_batch(done, total)`` is called after every batch (for a progress bar).
    """
    model.eval().to(device)
    total = len(loader.dataset)
    if total == 0:
        raise VmqError("the evaluation set is empty")
    n = top1 = top5 = 0
    start = time.perf_counter()
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        logits = model(images)
        if not torch.isfinite(logits).all():
            raise VmqError("the model produced NaN or Inf logits")
        k = min(5, logits.shape[-1])
        pred = logits.topk(k, dim=-1).indices
        hit = pred == target[:, None]
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=-1).sum().item()
        n += target.numel()
        if on_batch:
            on_batch(n, total)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "top1": round(100.0 * top1 / n, 3),
        "top1_err": round(100.0 - 100.0 * top1 / n, 3),
        "top5": round(100.0 * top5 / n, 3),
        "top5_err": round(100.0 - 100.0 * top5 / n, 3),
        "num_images": n,
        "images_per_sec": round(n / elapsed, 2),
        "eval_seconds": round(elapsed, 3),
    }

"""Top-1 / top-5 evaluation with JSON-ready results (keys as timm's ``validate.py``)."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vmq.errors import VmqError


def param_count(model: nn.Module) -> int:
    """Parameters, counting the weights that quantized and vector-quantized layers store too."""
    from vmq.quant.qlinear import QuantizedLinear
    from vmq.vq.qlinear import VQLinear

    n = sum(p.numel() for p in model.parameters())
    n += sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    return n + sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, VQLinear))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu",
             on_batch: Optional[Callable[[int, int], None]] = None,
             keep_logits: bool = False) -> Dict[str, float]:
    """Run ``model`` over ``loader``; returns top-1/top-5 (percent), image count and images/s.

    ``on_batch(done, total)`` is called after every batch (for a progress bar). With
    ``keep_logits`` the result also holds ``"logits"`` (N, classes) on the CPU, for
    :func:`agreement`.
    """
    model.eval().to(device)
    total = len(loader.dataset)
    if total == 0:
        raise VmqError("the evaluation set is empty")
    n = top1 = top5 = 0
    kept = []
    start = time.perf_counter()
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        logits = model(images)
        if not torch.isfinite(logits).all():
            raise VmqError("the model produced NaN or Inf logits")
        if keep_logits:
            kept.append(logits.float().cpu())
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
    extra = {"logits": torch.cat(kept)} if keep_logits else {}
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


def snr_db(ref: Tensor, out: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in float64; infinity when the two are equal."""
    noise = (ref.double() - out.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def agreement(reference_logits: Tensor, logits: Tensor) -> Dict[str, float]:
    """How closely ``logits`` follow ``reference_logits`` (same images, same order).

    ``top1_agreement``: percent of images with the same top-1 class; ``logit_snr_db``:
    10 log10(|ref|^2 / |ref - logits|^2) over all logits. Both are far less noisy than the
    difference of two top-1 accuracies on the same small set.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits of different shapes: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    same = (reference_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    snr = snr_db(reference_logits, logits)
    return {"top1_agreement": round(100.0 * same, 3), "logit_snr_db": round(snr, 3) if snr != float("inf") else None}

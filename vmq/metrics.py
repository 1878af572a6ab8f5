"""How closely a compressed output follows the floating-point one: SNR and top-1 agreement."""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from vmq.distributed import SINGLE, Dist


def snr_db(ref: Tensor, out: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in float64; infinity when the two are equal."""
    noise = (ref.double() - out.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def agreement(reference_logits: Tensor, logits: Tensor, dist: Dist = SINGLE) -> Dict[str, float]:
    """How closely ``logits`` follow ``reference_logits`` (same images, same order).

    ``top1_agreement``: percent of images with the same top-1 class; ``logit_snr_db``:
    10 log10(|ref|^2 / |ref - logits|^2) over all logits. Both are far less noisy than the
    difference of two top-1 accuracies on the same small set. Under torch.distributed
    (``dist``) each process gives the logits of its images and gets the figures over all images
    (the counts are reduced exactly, the float64 sums up to summation order).
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logits of different shapes: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    same, images, signal, noise = dist.sum(torch.stack([
        (reference_logits.argmax(-1) == logits.argmax(-1)).sum().double(),
        torch.tensor(float(reference_logits.shape[0]), dtype=torch.float64, device=logits.device),
        reference_logits.double().pow(2).sum(),
        (reference_logits.double() - logits.double()).pow(2).sum()])).tolist()
    same = same / images if images else float("nan")
    snr = float("inf") if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-30) / noise)
    return {"top1_agreement": round(100.0 * same, 3), "logit_snr_db": round(snr, 3) if snr != float("inf") else None}


__all__ = ["snr_db", "agreement"]

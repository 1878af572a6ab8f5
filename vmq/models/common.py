"""What several model families share: RMSNorm, stochastic depth, patch embedding, the ImageNet config."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torch import Tensor

from vmq.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm without bias: ``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 (:func:`vmq.ops.norm.rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class DropPath(nn.Module):
    """Stochastic depth on the batch dimension (identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping (or strided) patches of a square image as tokens, row-major over the grid."""

    def __init__(self, cfg):
        super().__init__()
        self.img_size = cfg.img_size
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.stride)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model expects {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


_IMAGENET_LABELS = tuple(ImageNetInfo().label_names())  # WordNet ids, the ImageNet folder names


def imagenet_cfg(**kw) -> dict:
    """The pretrained config of an ImageNet-1k classifier evaluated as the official Visual Mamba code
    does (DeiT-style: resize to 224/0.875, center crop 224, bicubic, ImageNet mean/std)."""
    return {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": 1000,
            "label_names": _IMAGENET_LABELS, "fixed_input_size": True, **kw}


__all__ = ["RMSNorm", "DropPath", "PatchEmbed", "imagenet_cfg"]

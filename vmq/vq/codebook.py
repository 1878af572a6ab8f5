"""Sub-vector layout of a weight matrix and the k-means codebook initialisation.

A weight (N, K_in) is zero-padded to (N, cols * d) and cut into ``N * cols`` sub-vectors of ``d``
consecutive input weights, row-major: sub-vector ``r * cols + j`` holds ``w[r, j*d:(j+1)*d]``.
Rows are split into groups of ``rows_per_group`` (the whole layer by default), each with its
own codebook of K codewords. With ``row_scale`` each row is divided by its RMS first (the scale
is rounded to fp16, as stored).

k-means weighs each coordinate by the input second moment E[x_c^2] of its input channel times
the square of its row's scale: that is the expected output error of replacing the weight,
to first order, with the inputs seen in calibration. Padded coordinates weigh zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from vmq.errors import VmqError
from vmq.ops.kmeans import kmeans
from vmq.vq.recipe import Codebook


@dataclass(frozen=True)
class Layout:
    out_features: int
    in_features: int
    dim: int
    rows_per_group: int

    @classmethod
    def of(cls, weight: Tensor, cfg: Codebook) -> "Layout":
        n, k = weight.shape
        return cls(n, k, cfg.dim, min(cfg.rows_per_group or n, n))

    @property
    def cols(self) -> int:
        return math.ceil(self.in_features / self.dim)

    @property
    def groups(self) -> int:
        return math.ceil(self.out_features / self.rows_per_group)

    @property
    def num_subvectors(self) -> int:
        return self.out_features * self.cols

    def split(self, w: Tensor) -> Tensor:
        """(N, K_in) -> (N * cols, d), zero-padding the input dimension."""
        pad = self.cols * self.dim - self.in_features
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(self.num_subvectors, self.dim)

    def merge(self, v: Tensor) -> Tensor:
        """(N * cols, d) -> (N, K_in), dropping the padding."""
        return v.reshape(self.out_features, self.cols * self.dim)[:, : self.in_features]

    def group_of(self, device: torch.device) -> Tensor:
        """The codebook group of every sub-vector, (N * cols,) int64."""
        rows = torch.arange(self.out_features, device=device) // self.rows_per_group
        return rows.repeat_interleave(self.cols)

    def group_slices(self):
        """(group, slice of sub-vectors) pairs: groups are contiguous row blocks."""
        per = self.rows_per_group * self.cols
        for g in range(self.groups):
            yield g, slice(g * per, min((g + 1) * per, self.num_subvectors))


def row_scales(weight: Tensor) -> Tensor:
    """Per-row RMS, rounded to fp16 (as stored), never zero; (N,) fp32."""
    rms = weight.float().pow(2).mean(dim=1).sqrt()
    return rms.clamp(min=1e-6).half().float().clamp(min=torch.finfo(torch.float16).tiny)


def importance(layout: Layout, second_moment: Optional[Tensor], scale: Optional[Tensor],
               device: torch.device) -> Tensor:
    """Per-coordinate k-means weights (N * cols, d): E[x_c^2] of the coordinate's input channel
    (ones when None) times its row's scale squared; zero on padding."""
    h = torch.ones(layout.in_features, device=device) if second_moment is None else second_moment.float().clamp(min=0)
    if second_moment is not None and h.shape != (layout.in_features,):
        raise ValueError(f"second moment must be ({layout.in_features},), got {tuple(h.shape)}")
    h = h / h.mean().clamp(min=1e-12)  # scale-free
    h = torch.nn.functional.pad(h, (0, layout.cols * layout.dim - layout.in_features)).reshape(1, layout.cols,
                                                                                                layout.dim)
    rows = torch.ones(layout.out_features, device=device) if scale is None else scale.float() ** 2
    return (rows[:, None, None] * h).reshape(layout.num_subvectors, layout.dim)


def init_codebook(name: str, weight: Tensor, cfg: Codebook, iterations: int,
                  second_moment: Optional[Tensor], seed: int) -> Tuple[Layout, Tensor, Tensor, Optional[Tensor], Tensor]:
    """k-means codebooks of one layer.

    Returns ``(layout, codebook (G, K, d) fp32, codes (N * cols,) local indices, scale (N,) or None,
    importance (N * cols, d))``; the codes are each sub-vector's nearest codeword.
    """
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise VmqError(f"{name}: the weights hold NaN or Inf")
    layout = Layout.of(w, cfg)
    smallest = min(s.stop - s.start for _, s in layout.group_slices())
    if cfg.size > smallest:
        raise VmqError(f"{name}: codebook.size {cfg.size} exceeds its {smallest} sub-vectors of dim {cfg.dim} "
                       f"(weight {tuple(w.shape)}); use a smaller codebook or more rows per group")
    scale = row_scales(w) if cfg.row_scale else None
    vectors = layout.split(w if scale is None else w / scale[:, None])
    imp = importance(layout, second_moment, scale, w.device)
    codebook = torch.empty(layout.groups, cfg.size, cfg.dim, device=w.device)
    codes = torch.empty(layout.num_subvectors, dtype=torch.int64, device=w.device)
    for g, sl in layout.group_slices():
        codebook[g], codes[sl] = kmeans(vectors[sl], cfg.size, iterations, imp[sl], seed=seed + g)
    return layout, codebook, codes, scale, imp


__all__ = ["Layout", "init_codebook", "importance", "row_scales"]

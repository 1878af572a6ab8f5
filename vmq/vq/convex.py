"""ViM-VQ's convex-combination codeword search (Deng et al. 2025), vmq's version.

While a block is being searched, each of its VQ layers is a :class:`ConvexVQLinear`. Every
sub-vector ``v_i`` that is not confirmed yet is the convex combination

    w_i = sum_j softmax(a_i)_j  C[c_ij]        over its ``k`` nearest codewords c_i1..c_ik,

and a confirmed one is its codeword ``C[code_i]``. The logits ``a`` start from a fit of each
combination to the floating-point sub-vector (importance-weighted least squares on the simplex,
so the soft weight starts close to the original), then the logits and the codebook ``C`` learn
together against the block's output error on calibration data. Between stages,
:func:`vmq.vq.incremental.confirm` fixes the most confident sub-vectors to their largest-weight
codeword; the ones still soft keep learning and absorb the error that this introduces.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmq.ops.kmeans import nearest_k
from vmq.quant.quantizers import ActQuantizer
from vmq.quant.recipe import ActivationScheme
from vmq.vq.codebook import Layout
from vmq.layers import VQLinear

FIT_STEPS = 100
FIT_LR = 0.1


def rows(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 2-D table, with a backward that sums in a fixed order.

    (Advanced indexing's backward on CPU adds into the table with parallel atomics, so the
    codebook gradient, and everything learnt from it, would change from run to run.)
    """
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[-1])


class ConvexVQLinear(nn.Module):
    """A linear layer with VQ weights that can be soft (convex combinations) while it learns."""

    def __init__(self, linear: nn.Linear, layout: Layout, codebook: Tensor, codes: Tensor, scale: Optional[Tensor],
                 importance: Tensor, act: Optional[ActivationScheme] = None, tokens: Optional[int] = None):
        super().__init__()
        self.layout = layout
        groups, size, dim = codebook.shape
        self.size = size
        self.codebook = nn.Parameter(codebook.reshape(groups * size, dim).clone(), requires_grad=False)
        device = codebook.device
        base = layout.group_of(device) * size
        self.register_buffer("base", base)
        self.register_buffer("code", base + codes)  # flat index into the codebook
        self.register_buffer("confirmed", torch.ones(layout.num_subvectors, dtype=torch.bool, device=device))
        self.register_buffer("scale", scale)
        self.register_buffer("importance", importance)
        w = linear.weight.detach().float()
        self.register_buffer("fp_weight", w.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("vectors", layout.split(w if scale is None else w / scale[:, None]))
        self.candidates: Optional[Tensor] = None
        self.logits: Optional[nn.Parameter] = None
        # the indices of the soft (not yet confirmed) sub-vectors, kept in step with ``confirmed``
        # where it changes, so that a forward never reads ``confirmed`` on the host (a GPU sync)
        self.soft: Optional[Tensor] = None
        self.a_quant = None if act is None else ActQuantizer(act.num_bits, act.strategy, tokens, device=device)
        self.act = act

    # -- the weight ---------------------------------------------------------------------------
    def subvectors(self) -> Tensor:
        sub = rows(self.codebook, self.code)
        soft = self.soft
        if self.logits is None or soft is None or soft.numel() == 0:
            return sub
        p = torch.softmax(self.logits.index_select(0, soft), dim=-1)
        mixed = (p.unsqueeze(-1) * rows(self.codebook, self.candidates.index_select(0, soft))).sum(1)
        return sub.index_put((soft,), mixed)

    def weight(self) -> Tensor:
        w = self.layout.merge(self.subvectors())
        return w if self.scale is None else w * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, self.weight(), self.bias)

    def float_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fp_weight, self.bias)

    # -- the search ---------------------------------------------------------------------------
    def start_search(self, candidates: int) -> None:
        """Make every sub-vector soft over its ``candidates`` nearest codewords (of its own group)."""
        n, k = self.layout.num_subvectors, candidates
        cand = torch.empty(n, k, dtype=torch.int64, device=self.vectors.device)
        dist = torch.empty(n, k, device=self.vectors.device)
        for g, sl in self.layout.group_slices():
            local = self.codebook.detach()[g * self.size:(g + 1) * self.size]
            i, d = nearest_k(self.vectors[sl], local, k, self.importance[sl])
            cand[sl], dist[sl] = i + g * self.size, d
        self.candidates = cand
        scale = dist.mean(dim=1, keepdim=True).clamp(min=1e-12)
        self.logits = nn.Parameter(-dist / scale)
        self.confirmed.zero_()
        self.soft = torch.arange(n, device=self.confirmed.device)
        self._fit_logits()

    @torch.enable_grad()
    def _fit_logits(self) -> None:
        """Importance-weighted least squares of each combination to its floating-point sub-vector."""
        opt = torch.optim.Adam([self.logits], lr=FIT_LR)
        c = self.codebook.detach()[self.candidates]  # (n, k, d)
        for _ in range(FIT_STEPS):
            p = torch.softmax(self.logits, dim=-1)
            err = (self.importance * ((p.unsqueeze(-1) * c).sum(1) - self.vectors) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            err.backward()
            opt.step()
        self.logits.grad = None

    def confidence(self) -> Tensor:
        """The largest combination weight of every sub-vector (1 for confirmed ones)."""
        with torch.no_grad():
            p = torch.softmax(self.logits, dim=-1).amax(dim=-1)
            return torch.where(self.confirmed, torch.ones_like(p), p)

    def confirm_indices(self, idx: Tensor) -> None:
        """Fix sub-vectors ``idx`` to their largest-weight candidate."""
        with torch.no_grad():
            best = self.logits[idx].argmax(dim=-1)
            self.code[idx] = self.candidates[idx, best]
            self.confirmed[idx] = True
            self.soft = (~self.confirmed).nonzero().squeeze(1)  # once per confirmation stage

    def freeze(self) -> VQLinear:
        if not bool(self.confirmed.all()):
            raise RuntimeError("freeze() needs every sub-vector confirmed")
        lay = self.layout
        codes = (self.code - self.base).reshape(lay.out_features, lay.cols)
        a = self.a_quant
        return VQLinear(codes, self.codebook.detach().reshape(-1, self.size, lay.dim), lay.in_features,
                        lay.rows_per_group, self.scale, self.bias,
                        None if a is None else a.bits, None if a is None else a.granularity,
                        None if a is None else a.scale.detach().reshape(-1).clone(),
                        None if a is None else a.zero_point.reshape(-1).to(torch.int32))


def learnable(layers: Dict[str, ConvexVQLinear]) -> Tuple[list, list]:
    """(logits, codebooks) of the layers, for the optimiser's two groups."""
    return [q.logits for q in layers.values()], [q.codebook for q in layers.values()]


__all__ = ["ConvexVQLinear", "learnable"]

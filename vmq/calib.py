"""Calibration, block by block: capture a block's inputs, observe its linear layers, run it.

Vim blocks pass ``(hidden, residual)`` along. :func:`embed_inputs` gives block 0's inputs for a
set of images; :func:`run_block` gives the next block's inputs; :class:`LinearObserver` records,
for chosen linear layers, what quantization needs of their inputs: per-channel max |x|,
per-token min and max, and (up to a cap) the raw inputs for the truncation search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

BlockIO = Tuple[Tensor, Optional[Tensor]]


@torch.no_grad()
def embed_inputs(model: nn.Module, images: Tensor, batch_size: int = 32) -> BlockIO:
    """Block 0's inputs: the embedded tokens of ``images`` (N, 3, H, W); no residual yet."""
    return torch.cat([model.embed(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]), None


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockIO, batch_size: int = 32) -> BlockIO:
    """Run one block over all samples in batches; returns its ``(hidden, residual)`` outputs."""
    hidden, residual = inputs
    outs_h, outs_r = [], []
    for i in range(0, hidden.shape[0], batch_size):
        r = None if residual is None else residual[i:i + batch_size]
        h, r = block(hidden[i:i + batch_size], r)
        outs_h.append(h)
        outs_r.append(r)
    return torch.cat(outs_h), torch.cat(outs_r)


@dataclass
class InputStats:
    """What one linear layer's input looked like over the calibration set."""

    channel_absmax: Tensor  # (in_features,)
    token_min: Tensor  # (tokens,)
    token_max: Tensor  # (tokens,)
    samples: List[Tensor] = field(default_factory=list)  # raw inputs (n, tokens, in_features), capped
    count: int = 0

    def update(self, x: Tensor, keep: int) -> None:
        x = x.detach().float()
        self.channel_absmax = torch.maximum(self.channel_absmax, x.abs().amax(dim=(0, 1)))
        self.token_min = torch.minimum(self.token_min, x.amin(dim=(0, 2)))
        self.token_max = torch.maximum(self.token_max, x.amax(dim=(0, 2)))
        room = keep - sum(s.shape[0] for s in self.samples)
        if room > 0:
            self.samples.append(x[:room].clone())
        self.count += x.shape[0]

    def sample_tensor(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


class LinearObserver:
    """Context manager: records :class:`InputStats` of the named linear layers of ``module``."""

    def __init__(self, module: nn.Module, names: Iterable[str], keep_samples: int = 0):
        self.module, self.names, self.keep = module, list(names), keep_samples
        self.stats: Dict[str, InputStats] = {}
        self._handles = []

    def __enter__(self) -> "LinearObserver":
        mods = dict(self.module.named_modules())
        for name in self.names:
            if name not in mods:
                raise KeyError(f"no layer named {name!r}")
            self._handles.append(mods[name].register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if x.dim() != 3:
                raise ValueError(f"{name}: expected (batch, tokens, channels) input, got {tuple(x.shape)}")
            st = self.stats.get(name)
            if st is None:
                inf = torch.full((x.shape[1],), float("inf"))
                st = self.stats[name] = InputStats(torch.zeros(x.shape[-1]), inf.clone(), -inf)
            st.update(x, self.keep)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

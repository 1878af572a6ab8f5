"""LocalVMamba (hunto/LocalMamba, ``local_vmamba.py``): VMamba with per-block scan directions,
including windowed scans, reusing the VMamba building blocks (:mod:`vmq.models.vmamba_parts`).

Semantics follow the official ``VSSM`` / ``SS2D`` / ``MultiScanVSSM`` as executed:

* patch embed: Conv2d(3, C0, 4, stride 4), LayerNorm; stages of blocks ``x + op(norm(x))`` (no
  MLP), ``PatchMerging2D`` after every stage but the last; LayerNorm, average pool, head;
  every LayerNorm has eps 1e-5;
* SS2D: ``in_proj`` (d -> 2D = x | z), depthwise 3x3 conv (bias) + SiLU; each block scans its
  own four directions (:func:`vmq.models.scan_orders.direction_order`: ``h``, ``v``, ``w2``,
  ``w7``, each optionally ``_flip``; a window scan runs over the grid zero-padded to a multiple
  of the window, and its padding steps only decay the state), each with its own x_proj, dt_proj,
  A and D; each direction's output back in token order goes through the block's one
  ``BiAttn`` channel gate, the gated outputs are summed, then ``out_norm``, ``* silu(z)``,
  ``out_proj``.

Non-square inputs run with each direction's exact inverse order; the official code un-scans
``v`` / ``v_flip`` with an H <-> W mix-up there (it is exact only on square grids), so its
outputs differ from these on non-square grids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from vmq.models.common import imagenet_cfg
from vmq.models.family import register_family
from vmq.models.reference import cifar_cfg
from vmq.models.registry import register
from vmq.models.scan_orders import direction_order, orders_on
from vmq.models.vmamba import VMambaFamily
from vmq.models.vmamba_parts import (SS2D, Classifier, PatchMerging2D, Stage, VSSBlock, VSSMBase, drop_path_rates,
                                     make_patch_embed, official_to_vmq, reset_vssm_parameters)

__all__ = ["LocalVMambaConfig", "LocalVMamba", "LocalSS2D", "BiAttn", "LocalVMambaFamily", "LOCAL_VMAMBA",
           "LOCAL_VSSM_TINY_DIRECTIONS", "LOCAL_VSSM_SMALL_DIRECTIONS"]


@dataclass(frozen=True)
class LocalVMambaConfig:
    """Every architectural choice of a LocalVMamba model. Saved in packed files to rebuild the model."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    dims: Tuple[int, ...] = (96, 192, 384, 768)  # an int d means (d, 2d, 4d, 8d)
    depths: Tuple[int, ...] = (2, 2, 9, 2)
    directions: Tuple[Tuple[str, ...], ...] = ()  # the scan directions of each block, in global block order
    ssm_d_state: int = 16
    ssm_ratio: float = 2.0
    dt_rank: int = 0  # 0: "auto", ceil(stage dim / 16)
    ssm_conv: int = 3
    ssm_conv_bias: bool = True
    attn_ratio: float = 0.125  # BiAttn's reduced width: int(attn_ratio * d_inner)
    norm_epsilon: float = 1e-5
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        depths = tuple(int(d) for d in self.depths)
        dims = self.dims
        dims = tuple(int(dims) * 2 ** i for i in range(len(depths))) if isinstance(dims, int) else tuple(map(int, dims))
        directions = tuple(tuple(block) for block in self.directions)
        for name, value in (("depths", depths), ("dims", dims), ("directions", directions)):
            object.__setattr__(self, name, value)
        if not depths or len(dims) != len(depths) or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"dims {dims} and depths {depths} must be positive, one per stage")
        if len(directions) != sum(depths) or not all(directions):
            raise ValueError(f"directions needs one non-empty set per block ({sum(depths)}), got {len(directions)}")
        for name in {d for block in directions for d in block}:
            direction_order(name, 1, 1)  # ValueError for an unknown direction
        if self.ssm_conv < 3 or self.ssm_conv % 2 == 0:
            raise ValueError(f"ssm_conv must be an odd kernel size of at least 3, got {self.ssm_conv}")
        if self.ssm_d_state < 1 or self.ssm_ratio <= 0 or self.dt_rank < 0 or not 0 < self.attn_ratio <= 1:
            raise ValueError("ssm_d_state must be >= 1, ssm_ratio > 0, dt_rank >= 0 and attn_ratio in (0, 1]")
        if self.patch_size < 1 or self.patch_size > self.img_size:
            raise ValueError(f"patch_size {self.patch_size} does not fit img_size {self.img_size}")

    def d_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    def stage_dt_rank(self, stage: int) -> int:
        return self.dt_rank or math.ceil(self.dims[stage] / 16)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dims=list(self.dims), depths=list(self.depths), directions=[list(b) for b in self.directions])
        return d  # as JSON reads it back

    @classmethod
    def from_dict(cls, d: dict) -> "LocalVMambaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LocalVMamba config keys: {', '.join(unknown)}")
        return cls(**d)


class BiAttn(nn.Module):
    """The channel gate of LocalMamba: ``y * sigmoid(channel_select(gelu(global_reduce(mean_L(norm(y))))))``.

    The token mean is kept as one token, so that both linear layers see (batch, 1, features).
    """

    def __init__(self, dim: int, reduced: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.global_reduce = nn.Linear(dim, reduced)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(reduced, dim)

    def forward(self, y: Tensor) -> Tensor:
        pooled = self.norm(y).mean(dim=1, keepdim=True)  # (b, 1, D)
        return y * torch.sigmoid(self.channel_select(self.act(self.global_reduce(pooled))))


class LocalSS2D(SS2D):
    """SS2D with the block's own scan ``directions`` and the ``attn`` gate per direction before the sum
    (``in_index = out_index``: the direction orders stacked, -1 at window and stack padding)."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int, conv_bias: bool,
                 directions: Sequence[str], attn_ratio: float, eps: float):
        super().__init__(d_model, d_inner, d_state, dt_rank, d_conv, conv_bias, gated=True, eps=eps,
                         num_directions=len(directions))
        self.directions = tuple(directions)
        self.attn = BiAttn(d_inner, int(attn_ratio * d_inner), eps)

    def orders(self, height: int, width: int, device: torch.device) -> Tensor:
        return orders_on(self.directions, height, width, device)

    def mix(self, u: Tensor, height: int, width: int) -> Tensor:
        ys = self.selective_scan(u, height, width, "none")  # (b, K, D, L) in token order
        out = None
        for y in ys.unbind(1):
            gated = self.attn(y.transpose(1, 2))
            out = gated if out is None else out + gated
        return out


class LocalVMamba(VSSMBase):
    """The LocalVMamba classifier, with VMamba's module names (``op.attn`` is the official
    ``op.multi_scan.attn``)."""

    def __init__(self, cfg: Optional[LocalVMambaConfig] = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = LocalVMambaConfig(**overrides)
        elif overrides:
            cfg = LocalVMambaConfig(**{**cfg.to_dict(), **overrides})
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        eps = cfg.norm_epsilon
        self.patch_embed = make_patch_embed("v1", cfg.in_chans, cfg.dims[0], cfg.patch_size, eps)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        stages, index = [], 0
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            blocks = []
            for j in range(depth):
                op = LocalSS2D(dim, cfg.d_inner(i), cfg.ssm_d_state, cfg.stage_dt_rank(i), cfg.ssm_conv,
                               cfg.ssm_conv_bias, cfg.directions[index], cfg.attn_ratio, eps)
                blocks.append(VSSBlock(dim, op, 0, rates[i][j], eps))
                index += 1
            last = i == len(cfg.dims) - 1
            stages.append(Stage(blocks, None if last else PatchMerging2D(dim, cfg.dims[i + 1], eps)))
        self.layers = nn.ModuleList(stages)
        self.classifier = Classifier(cfg.dims[-1], cfg.num_classes, eps)
        reset_vssm_parameters(self)


class LocalVMambaFamily(VMambaFamily):
    """LocalVMamba for the engine: VMamba's protocol (blocks ``layers.{i}.blocks.{j}.`` and
    ``layers.{i}.downsample.``, ``(x,)`` channel-last, the same default targets and folds).

    Besides what stays in floating point in VMamba, the ``BiAttn`` gate (``op.attn``: a
    LayerNorm and two small linear layers on one pooled token per direction, producing a
    sigmoid gate) is not a default target. ``out_proj`` has no fold: ``* silu(z)`` follows
    ``out_norm``.
    """

    name = "local_vmamba"
    model_class = LocalVMamba
    config_class = LocalVMambaConfig

    def checkpoint_filter(self, state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
        return official_to_vmq(state_dict, renames=[(r"\.op\.multi_scan\.attn\.", ".op.attn.")])


LOCAL_VMAMBA = register_family(LocalVMambaFamily())


# -- registered models (the official local_vssm_tiny / local_vssm_small) -----------------------------
def _sets(text: str) -> Tuple[Tuple[str, ...], ...]:
    return tuple(tuple(block.split()) for block in text.split("|"))


LOCAL_VSSM_TINY_DIRECTIONS = _sets(
    "h h_flip w7 w7_flip | h_flip v_flip w2 w2_flip | h_flip v_flip w2_flip w7 | h_flip v v_flip w2"
    "| h h_flip v_flip w2_flip | h_flip v_flip w2 w2_flip | h w2_flip w7 w7_flip | h h_flip v v_flip"
    "| h v_flip w7 w7_flip | h_flip v w2 w7_flip | v v_flip w2 w7_flip | h h_flip v_flip w2_flip"
    "| v_flip w2_flip w7 w7_flip | h_flip v_flip w2_flip w7_flip | h_flip v w7 w7_flip")
LOCAL_VSSM_SMALL_DIRECTIONS = _sets(
    "h v v_flip w7_flip | h h_flip v w7 | h_flip v v_flip w7 | h_flip v w2_flip w7 | h_flip v w2_flip w7"
    "| h_flip v_flip w2 w7_flip | h_flip v v_flip w7 | h v v_flip w7 | h v v_flip w7 | h v v_flip w7_flip"
    "| h h_flip v v_flip | h v v_flip w2 | v v_flip w2_flip w7 | h h_flip v w2 | h_flip v v_flip w7_flip"
    "| h h_flip v v_flip | h v v_flip w7_flip | h v v_flip w7_flip | h h_flip v_flip w7 | h_flip v_flip w2_flip w7"
    "| h_flip v v_flip w7_flip | v v_flip w7 w7_flip | h v v_flip w7_flip | h_flip v v_flip w2 | h v v_flip w2_flip"
    "| h h_flip v w7 | h h_flip w7 w7_flip | h v_flip w2 w2_flip | h v_flip w2 w7 | h v v_flip w7_flip"
    "| h_flip v w2_flip w7 | h_flip v_flip w7 w7_flip | h v w7 w7_flip")

_TINY = LocalVMambaConfig(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2), directions=LOCAL_VSSM_TINY_DIRECTIONS,
                          drop_path_rate=0.2)
_SMALL = replace(_TINY, depths=(2, 2, 27, 2), directions=LOCAL_VSSM_SMALL_DIRECTIONS)
_LOCAL_CFG = imagenet_cfg(first_conv="patch_embed.0", classifier="classifier.head", license="apache-2.0")
register(LOCAL_VMAMBA, "local_vssm_tiny", _TINY, _LOCAL_CFG, aliases=("local_vmamba_tiny",))
register(LOCAL_VMAMBA, "local_vssm_small", _SMALL, _LOCAL_CFG, aliases=("local_vmamba_small",))
# tiny variant for tests (random weights; the shapes of ../shared/fixtures/localvmamba_micro*: block i
# uses local_vssm_tiny's direction set i)
register(LOCAL_VMAMBA, "test_local_vmamba",
         replace(_TINY, img_size=64, num_classes=10, dims=(24, 48, 96, 192), depths=(1, 1, 2, 1),
                 directions=LOCAL_VSSM_TINY_DIRECTIONS[:5]),
         cifar_cfg(input_size=(3, 64, 64), first_conv="patch_embed.0", classifier="classifier.head"))

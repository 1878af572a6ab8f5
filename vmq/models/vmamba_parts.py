"""Building blocks of the VMamba family, shared with LocalVMamba (:mod:`vmq.models.local_vmamba`).

Everything runs channel-last: a stage's activations are (batch, H, W, C), and every linear layer
is called on the row-major tokens ``(batch, H * W, features)`` (:func:`tokens`), whatever layout
the official code uses (its ``LayerNorm2d`` / ``Linear2d`` channel-first path computes the same
numbers). Module names follow the official state dict wherever the official module is a module
(``patch_embed.{0,2,5,7}``, ``norm``, ``op.in_proj``, ``mlp.fc1``, ``downsample.reduction``,
``classifier.head``...); where it is not, :func:`official_to_vmq` maps the official keys:

* the stacked per-direction projections ``op.x_proj_weight (K, R+2N, D)`` and
  ``op.dt_projs_weight (K, D, R)`` are K modules ``op.x_proj.{k}`` / ``op.dt_projs.{k}``
  (``dt_projs_bias``, ``A_logs`` and ``Ds`` keep their official names and layouts);
* the downsample v3 conv ``downsample.1`` (Conv2d(d, 2d, 3, stride 2, padding 1)) is
  ``downsample.proj``, a linear layer over unfolded 3x3 patches: weight (2d, d, 3, 3) reshaped
  to (2d, 9d), which is ``F.unfold``'s (channel, kernel row, kernel column) feature order;
  its LayerNorm ``downsample.3`` is ``downsample.norm``;
* the legacy names that the official ``VSSM._load_from_state_dict`` renames, and ``Linear2d``
  weights stored as (out, in, 1, 1).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vmq.models.common import DropPath
from vmq.models.scan_orders import CROSS_DIRECTIONS, orders_on
from vmq.ops.multi_scan import multi_direction_scan, multi_scan
from vmq.ops.scan import one_direction_scan

__all__ = ["Permute", "tokens", "make_patch_embed", "PatchMerging2D", "ConvDownsample", "Mlp", "SS2D", "VSSBlock",
           "Stage", "Classifier", "VSSMBase", "reset_vssm_parameters", "drop_path_rates", "official_to_vmq",
           "hierarchical_blocks"]


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def tokens(x: Tensor) -> Tensor:
    """(batch, H, W, C) -> (batch, H * W, C), tokens row-major: how every linear layer sees a grid."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def make_patch_embed(version: str, in_chans: int, dim: int, patch_size: int, eps: float) -> nn.Sequential:
    """The stem, (batch, 3, H, W) -> (batch, H/4, W/4, dim), indexed like the official channel-last stem.

    ``v1``: Conv2d(k=patch, stride=patch) [0], LayerNorm [2]. ``v2``: Conv2d(dim/2, k=patch/2+1,
    stride=patch/2, padding 1) [0], LayerNorm [2], GELU, Conv2d(dim) likewise [5], LayerNorm [7].
    """
    if version == "v1":
        return nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), Permute(0, 2, 3, 1),
                             nn.LayerNorm(dim, eps=eps))
    stride = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, stride + 1, stride=stride, padding=1), Permute(0, 2, 3, 1),
        nn.LayerNorm(dim // 2, eps=eps), Permute(0, 3, 1, 2), nn.GELU(),
        nn.Conv2d(dim // 2, dim, stride + 1, stride=stride, padding=1), Permute(0, 2, 3, 1),
        nn.LayerNorm(dim, eps=eps))


class PatchMerging2D(nn.Module):
    """Downsample v1: zero-pad H and W to even, concatenate the 2x2 neighbours (h even / w even,
    h odd / w even, h even / w odd, h odd / w odd), LayerNorm(4d), Linear(4d, 2d) without bias."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(tokens(x))).view(b, (h + 1) // 2, (w + 1) // 2, -1)


class ConvDownsample(nn.Module):
    """Downsample v3: Conv2d(d, 2d, 3, stride 2, padding 1) with bias, then LayerNorm(2d).

    The conv is ``proj``, a linear layer over the unfolded 3x3 patches (batch, tokens, 9d), so
    that PTQ and VQ can compress it like any projection.
    """

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(9 * dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        patches = F.unfold(x.permute(0, 3, 1, 2), 3, padding=1, stride=2)  # (b, 9d, tokens)
        return self.norm(self.proj(patches.transpose(1, 2))).view(b, (h + 1) // 2, (w + 1) // 2, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SS2D(nn.Module):
    """The 2-D selective-scan mixer with K directions (VMamba's cross scan).

    ``x`` (b, H, W, d) -> ``in_proj`` (d -> D, or 2D = x | z when ``gated``) -> depthwise conv
    + SiLU = ``u``; per direction k: ``x_proj.{k}(u)`` = [dt (R) | B (N) | C (N)] and
    ``delta = dt_projs.{k}(dt)`` (no bias: ``dt_projs_bias`` is the scan's ``delta_bias``);
    the scan of the K directions (``u`` shared, every tensor in token order, the directions
    through their orders), merged (:meth:`mix`), ``out_norm``, ``* silu(z)`` when gated,
    ``out_proj``. ``A_logs`` and ``Ds`` hold the K directions' rows K-major (row ``k * D + d``).

    ``scan``: "fused" (one :func:`vmq.ops.multi_scan.multi_scan` call) or a one-direction scan of
    :func:`vmq.ops.scan.one_direction_scan` run per direction ("train", "reference", "mamba_ssm").
    """

    def __init__(self, d_model: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int, conv_bias: bool,
                 gated: bool, eps: float, num_directions: int = 4, scan: str = "fused"):
        super().__init__()
        K = num_directions
        self.d_inner, self.d_state, self.dt_rank, self.gated, self.scan = d_inner, d_state, dt_rank, gated, scan
        self.in_proj = nn.Linear(d_model, d_inner * (2 if gated else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.ModuleList(nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False) for _ in range(K))
        self.dt_projs = nn.ModuleList(nn.Linear(dt_rank, d_inner, bias=False) for _ in range(K))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner, eps=eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init as the official ``mamba_init``: dt weights U(+-R^-0.5), dt bias the inverse
        softplus of a log-uniform dt in [1e-3, 0.1], S4D-real ``A_logs = log(1..N)``, ``Ds = 1``;
        ``x_proj`` keeps nn.Linear's default init."""
        for x_proj, dt_proj in zip(self.x_proj, self.dt_projs):
            x_proj.reset_parameters()
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(n).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def conv_branch(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``u`` (b, D, H*W) = SiLU(conv(in_proj(x))), and the gate branch ``z`` (b, H*W, D) or None."""
        b, h, w, _ = x.shape
        xz = self.in_proj(tokens(x))
        xs, z = xz.chunk(2, dim=-1) if self.gated else (xz, None)
        u = F.silu(self.conv2d(xs.transpose(1, 2).reshape(b, -1, h, w)))
        return u.flatten(2), z

    def scan_inputs(self, u: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per direction, in token order: ``delta`` (b, D, L) before its bias, ``B`` and ``C`` (b, N, L)."""
        u_tokens = u.transpose(1, 2)  # (b, L, D)
        deltas, Bs, Cs = [], [], []
        for x_proj, dt_proj in zip(self.x_proj, self.dt_projs):
            dt, B, C = x_proj(u_tokens).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            deltas.append(dt_proj(dt).transpose(1, 2))
            Bs.append(B.transpose(1, 2))
            Cs.append(C.transpose(1, 2))
        return deltas, Bs, Cs

    def orders(self, height: int, width: int, device: torch.device) -> Tensor:
        """(K, steps) scan orders over the H x W grid: VMamba's cross scan (h, v, h_flip, v_flip)."""
        return orders_on(CROSS_DIRECTIONS, height, width, device)

    def selective_scan(self, u: Tensor, height: int, width: int, merge: str) -> Tensor:
        """The K directions' outputs (``D * u`` included) in token order: (b, D, L) summed, or (b, K, D, L)."""
        deltas, Bs, Cs = self.scan_inputs(u)
        K = len(deltas)
        order = self.orders(height, width, u.device)
        args = dict(D=self.Ds.float().view(K, -1), delta_bias=self.dt_projs_bias.float(), z=None, in_index=order,
                    out_index=order, seqlen=height * width, delta_softplus=True, merge=merge)
        A = -torch.exp(self.A_logs.float()).view(K, self.d_inner, self.d_state)
        if self.scan == "fused":
            return multi_scan([u] * K, deltas, A, Bs, Cs, **args)
        return multi_direction_scan([u] * K, deltas, A, Bs, Cs, scan=one_direction_scan(self.scan, u.device), **args)

    def mix(self, u: Tensor, height: int, width: int) -> Tensor:
        """The merged scan output (b, L, D), the input of ``out_norm``: the plain sum of the directions."""
        return self.selective_scan(u, height, width, "sum").transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        u, z = self.conv_branch(x)
        y = self.out_norm(self.mix(u, h, w).to(x.dtype))
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y).view(b, h, w, -1)


class VSSBlock(nn.Module):
    """``x + op(norm(x))``, then ``x + mlp(norm2(x))`` when the block has an MLP (pre-norm)."""

    def __init__(self, dim: int, op: SS2D, mlp_hidden: int, drop_path: float, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.op = op
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.has_mlp = mlp_hidden > 0
        if self.has_mlp:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(tokens(x))).view(x.shape))
        return x


class Stage(nn.Module):
    """``blocks`` then, except in the last stage, ``downsample``."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class Classifier(nn.Module):
    """LayerNorm, global average pool over H x W, ``head``."""

    def __init__(self, dim: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: Tensor) -> Tensor:
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(x))


class VSSMBase(nn.Module):
    """``patch_embed`` -> ``layers`` (stages) -> ``classifier``; subclasses build the modules."""

    patch_embed: nn.Module
    layers: nn.ModuleList
    classifier: Classifier

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled features (batch, C_last), the head's input."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.classifier.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.head(self.forward_features(x))


def drop_path_rates(rate: float, depths: Sequence[int]) -> List[List[float]]:
    """The stochastic-depth rate of each block, per stage: linear from 0 to ``rate`` over all blocks."""
    n = sum(depths)
    flat = [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    return [flat[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


@torch.no_grad()
def reset_vssm_parameters(model: nn.Module) -> None:
    """The official init: linear layers trunc_normal(0.02) with zero bias and LayerNorms (1, 0),
    except the per-direction projections (:meth:`SS2D.reset_ssm_parameters`) and the downsample
    conv, which keep their default (nn.Linear / nn.Conv2d: the same kaiming-uniform) init."""
    keep = set()
    for m in model.modules():
        if isinstance(m, SS2D):
            m.reset_ssm_parameters()
            keep.update(id(p) for p in (*m.x_proj, *m.dt_projs))
        elif isinstance(m, ConvDownsample):
            keep.add(id(m.proj))
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in keep:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def hierarchical_blocks(model: VSSMBase) -> List[Tuple[str, nn.Module]]:
    """Every VSS block and every downsample, in order, with its name prefix."""
    out: List[Tuple[str, nn.Module]] = []
    for i, stage in enumerate(model.layers):
        out += [(f"layers.{i}.blocks.{j}.", block) for j, block in enumerate(stage.blocks)]
        if stage.downsample is not None:
            out.append((f"layers.{i}.downsample.", stage.downsample))
    return out


# -- official checkpoints ---------------------------------------------------------------------------
_LEGACY = [(re.compile(p), r) for p, r in (
    (r"^patch_embed\.proj\.", "patch_embed.0."), (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."), (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
    (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head."))]
_STACKED = re.compile(r"(.*\.op\.)(x_proj|dt_projs)_weight")
_CONV_DOWNSAMPLE = re.compile(r"(layers\.\d+\.downsample\.)([13])\.(weight|bias)")
_LINEAR2D = re.compile(r".*\.(in_proj|out_proj|fc1|fc2|reduction)\.weight")


def official_to_vmq(sd: Dict[str, Tensor], renames: Iterable[Tuple[str, str]] = ()) -> Dict[str, Tensor]:
    """An official VMamba-style state dict in vmq's names (see the module docstring); keys that
    are already vmq's pass unchanged. ``renames``: extra (regex, replacement) applied first."""
    rules = [(re.compile(p), r) for p, r in renames] + _LEGACY
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        if (m := _STACKED.fullmatch(key)) and value.dim() == 3:
            for k in range(value.shape[0]):
                out[f"{m[1]}{m[2]}.{k}.weight"] = value[k]
            continue
        if m := _CONV_DOWNSAMPLE.fullmatch(key):
            if m[3] == "weight" and value.dim() == 4:
                value = value.reshape(value.shape[0], -1)
            key = f"{m[1]}{'proj' if m[2] == '1' else 'norm'}.{m[3]}"
        elif _LINEAR2D.fullmatch(key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        out[key] = value
    return out

"""Vision Mamba (Vim): vmq's own implementation, loading official checkpoints by their key names.

Semantics follow the official Vim model (hustvl/Vim, ``vim/models_mamba.py``) as executed by
its fused path:

* patch embedding ``Conv2d(kernel=patch, stride=stride)``, tokens row-major over the grid;
* a cls token inserted at ``M // 2`` (middle) or 0 (head) *before* the position embedding;
* blocks ``residual = residual + hidden; hidden = mixer(norm(residual))`` with an fp32
  residual stream, then ``norm_f(residual + hidden)``;
* the bimamba v2 mixer: a forward scan and a backward scan with its own conv1d, x_proj,
  dt_proj, A_b_log and D_b over the time-reversed sequence, summed, halved when
  ``if_divide_out``, then ``out_proj``;
* output: the normed cls token when there is one (``final_pool_type`` is then unused, as in
  the official code), otherwise the pooled tokens.

Unlike the official code, every projection is called as a module (so observers and quantized
replacements see in_proj, x_proj, dt_proj and out_proj of both directions) and both scan
directions are always computed.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vmq.models.common import DropPath, PatchEmbed, RMSNorm, imagenet_cfg
from vmq.models.family import BenchGroups, BlockIO, Fold, ModelFamily, register_family, scan_set
from vmq.models.reference import REFERENCE_MODEL, REFERENCE_WEIGHTS, cifar_cfg
from vmq.models.registry import register
from vmq.models.scan_orders import VIM_DIRECTIONS, orders_on
from vmq.ops.conv import bidirectional_conv1d_silu
from vmq.ops.multi_scan import multi_direction_scan, multi_scan
from vmq.ops.scan import one_direction_scan

__all__ = ["VimConfig", "VisionMamba", "MambaMixer", "Block", "VimFamily", "VIM", "REFERENCE_CONFIG"]


@dataclass(frozen=True)
class VimConfig:
    """Every architectural choice of a Vim model. Saved in packed files to rebuild the model."""

    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(embed_dim / 16), as in Mamba
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    bimamba_type: str = "v2"  # "v2" (two directions) or "none" (forward only)
    if_divide_out: bool = True
    if_cls_token: bool = True
    use_middle_cls_token: bool = True
    if_abs_pos_embed: bool = True
    final_pool_type: str = "mean"  # used only without a cls token: "mean" or "none" (last token)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.bimamba_type not in ("v2", "none"):
            raise ValueError(f"bimamba_type must be 'v2' or 'none', got {self.bimamba_type!r}")
        if self.final_pool_type not in ("mean", "none"):
            raise ValueError(f"final_pool_type must be 'mean' or 'none', got {self.final_pool_type!r}")
        if self.patch_size > self.img_size or self.stride < 1:
            raise ValueError(f"patch_size {self.patch_size} / stride {self.stride} do not fit img_size {self.img_size}")
        for name in ("embed_dim", "depth", "d_state", "d_conv", "expand", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.embed_dim / 16)

    @property
    def grid_size(self) -> Tuple[int, int]:
        g = (self.img_size - self.patch_size) // self.stride + 1
        return (g, g)

    @property
    def num_patches(self) -> int:
        g = self.grid_size
        return g[0] * g[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.if_cls_token else 0)

    @property
    def cls_position(self) -> Optional[int]:
        if not self.if_cls_token:
            return None
        return self.num_patches // 2 if self.use_middle_cls_token else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VimConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Vim config keys: {', '.join(unknown)}")
        return cls(**d)


class MambaMixer(nn.Module):
    """The bimamba v2 mixer with official parameter names (``*_b`` for the backward direction).

    ``scan``: "fused" runs both directions and the gate in one ``vmq.ops.multi_scan`` call
    (inference); otherwise the name of a one-direction scan of ``vmq.ops.one_direction_scan`` run
    per direction ("train": differentiable, for JLSS and the VQ search; "mamba_ssm"; "reference").
    The family's ``scan_implementation`` switches it for a whole model.
    """

    def __init__(self, cfg: VimConfig, scan: str = "fused"):
        super().__init__()
        d_model, d_inner, d_state = cfg.embed_dim, cfg.d_inner, cfg.d_state
        dt_rank = cfg.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.bidirectional = cfg.bimamba_type == "v2"
        self.if_divide_out = cfg.if_divide_out
        self.scan = scan

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        if self.bidirectional:
            self.conv1d_b = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1)
            self.x_proj_b = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
            self.dt_proj_b = nn.Linear(dt_rank, d_inner, bias=True)
            self.A_b_log = nn.Parameter(torch.empty(d_inner, d_state))
            self.D_b = nn.Parameter(torch.empty(d_inner))

    def directions(self):
        """(conv1d, x_proj, dt_proj, A_log, D) for each direction, forward first."""
        dirs = [(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]
        if self.bidirectional:
            dirs.append((self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))
        return dirs

    def branch(self, x: Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, reverse: bool = False):
        """Scan inputs of one direction, in the original time order: ``(u, delta, B, C)``.

        ``x`` is (b, d_inner, l). The backward direction's conv is causal in reversed time (the
        official code runs it on the flipped sequence); x_proj and dt_proj act token by token.
        ``delta`` is dt_proj's output including its bias, before the softplus.
        """
        seqlen = x.shape[-1]
        if reverse:
            u = F.silu(conv1d(x.flip(-1))[..., :seqlen]).flip(-1)
        else:
            u = F.silu(conv1d(x)[..., :seqlen])
        return self.project(u, x_proj, dt_proj)

    def project(self, u: Tensor, x_proj: nn.Linear, dt_proj: nn.Linear):
        """``(u, delta, B, C)`` from one direction's conv output ``u`` (b, d_inner, l)."""
        x_dbl = x_proj(u.transpose(1, 2))  # (b, l, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt_proj(dt).transpose(1, 2)  # (b, d_inner, l)
        return u, delta, B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (b, 2*d_inner, l)
        x, z = xz.chunk(2, dim=1)
        directions = self.directions()
        orders = orders_on(VIM_DIRECTIONS if self.bidirectional else VIM_DIRECTIONS[:1], 1, x.shape[-1], x.device)
        A = torch.stack([-torch.exp(A_log.float()) for *_, A_log, _ in directions])
        D = torch.stack([D.float() for *_, D in directions])
        merge = "mean" if self.bidirectional and self.if_divide_out else "sum"
        if self.scan == "fused" and self.bidirectional:
            # inference: both convs in one fused call (token-major outputs, what x_proj and the scan
            # read best), then every scan direction and the gate in one fused call
            (conv, x_proj, dt_proj, *_), (conv_b, x_proj_b, dt_proj_b, *_) = directions
            u, u_b = bidirectional_conv1d_silu(x, conv.weight[:, 0], conv.bias, conv_b.weight[:, 0], conv_b.bias)
            inputs = [self.project(u, x_proj, dt_proj), self.project(u_b, x_proj_b, dt_proj_b)]
        else:
            inputs = [self.branch(x, conv, x_proj, dt_proj, reverse=k == 1)
                      for k, (conv, x_proj, dt_proj, *_) in enumerate(directions)]
        u, delta, B, C = ([t[i] for t in inputs] for i in range(4))
        if self.scan == "fused":
            out = multi_scan(u, delta, A, B, C, D, None, z, orders, orders, delta_softplus=True, merge=merge)
        else:  # a one-direction scan per direction (training, or mamba-ssm's as a baseline)
            out = multi_direction_scan(u, delta, A, B, C, D, None, z, orders, orders, x.shape[-1], True, merge,
                                       scan=one_direction_scan(self.scan, hidden.device))
        return self.out_proj(out.to(hidden.dtype).transpose(1, 2))


class Block(nn.Module):
    """Add -> norm -> mixer; returns ``(mixer output, residual)`` like the official block."""

    def __init__(self, cfg: VimConfig, drop_path: float):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.mixer = MambaMixer(cfg)
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_epsilon)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class VisionMamba(nn.Module):
    def __init__(self, cfg: Optional[VimConfig] = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = VimConfig(**overrides)
        elif overrides:
            cfg = VimConfig(**{**cfg.to_dict(), **overrides})
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim

        self.patch_embed = PatchEmbed(cfg)
        if cfg.if_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = [0.0] + [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(cfg.embed_dim, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_epsilon)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    # -- initialisation (Mamba's SSM init, GPT-2 style out_proj rescale, ViT-style embeddings) --
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / (cfg.in_chans * cfg.patch_size ** 2)))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if cfg.if_cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if cfg.if_abs_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.layers:
            m = block.mixer
            for conv, x_proj, dt_proj, A_log, D in m.directions():
                conv.reset_parameters()
                x_proj.reset_parameters()
                std = m.dt_rank ** -0.5
                nn.init.uniform_(dt_proj.weight, -std, std)
                dt = torch.exp(torch.rand(m.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand(m.d_inner, -1))
                D.fill_(1.0)
            m.in_proj.reset_parameters()
            m.out_proj.reset_parameters()
            m.out_proj.weight /= math.sqrt(cfg.depth)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding with the cls token inserted and the position embedding added."""
        x = self.patch_embed(x)
        pos = self.cfg.cls_position
        if pos is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :pos], cls, x[:, pos:]), dim=1)
        if self.cfg.if_abs_pos_embed:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        hidden, residual = self.embed(x), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.pooled(hidden, residual)

    def pooled(self, hidden: Tensor, residual: Tensor) -> Tensor:
        """The head's input from the last block's ``(hidden, residual)``."""
        residual = residual + self.drop_path(hidden)
        hidden = self.norm_f(residual.to(self.norm_f.weight.dtype))
        pos = self.cfg.cls_position
        if pos is not None:
            return hidden[:, pos]
        if self.cfg.final_pool_type == "mean":
            return hidden.mean(dim=1)
        return hidden[:, -1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# -- the family protocol ---------------------------------------------------------------------------
_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


class VimFamily(ModelFamily):
    """Vim for the engine: blocks ``layers.{i}.`` passing ``(hidden, residual)``."""

    name = "vim"
    model_class = VisionMamba
    config_class = VimConfig
    bench_groups = BenchGroups(
        order=("patch_embed", *_PROJECTIONS, "mixer other (conv, scan, gates)", "norms", "head"),
        remainders={"mixer": ("mixer other (conv, scan, gates)", _PROJECTIONS)})

    def blocks(self, model: VisionMamba) -> List[Tuple[str, nn.Module]]:
        return [(f"layers.{i}.", block) for i, block in enumerate(model.layers)]

    def embed(self, model: VisionMamba, images: Tensor) -> BlockIO:
        return model.embed(images), None

    def run_block(self, block: Block, io: BlockIO) -> BlockIO:
        return block(io[0], io[1])

    def block_output(self, io: BlockIO) -> Tensor:
        return io[0]  # the mixer output; the residual stream is the sum of the earlier ones

    def head(self, model: VisionMamba, io: BlockIO) -> Tensor:
        return model.head(model.pooled(io[0], io[1]))

    def default_targets(self) -> List[str]:
        return [r"re:layers\.\d+\.mixer\.(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj)$"]

    def smoothing_folds(self, block: Block) -> List[Fold]:
        # in_proj reads the block's norm; dt_proj reads the first dt_rank outputs of x_proj
        dt_rows = (0, block.mixer.dt_rank)
        folds = [Fold("mixer.in_proj", "norm"), Fold("mixer.dt_proj", "mixer.x_proj", dt_rows)]
        if block.mixer.bidirectional:
            folds.append(Fold("mixer.dt_proj_b", "mixer.x_proj_b", dt_rows))
        return folds

    @contextlib.contextmanager
    def scan_implementation(self, model: VisionMamba, impl: str) -> Iterator[None]:
        with scan_set([block.mixer for block in model.layers], impl):
            yield

    def bench_group(self, module_name: str) -> Optional[str]:
        if module_name in ("patch_embed", "head"):
            return module_name
        m = re.fullmatch(r"layers\.\d+\.mixer(?:\.(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj))?", module_name)
        if m:
            return "mixer" if m.group(1) is None else m.group(1).removesuffix("_b")
        if re.fullmatch(r"layers\.\d+\.norm|norm_f", module_name):
            return "norms"
        return None

    def input_size(self, model: VisionMamba) -> Tuple[int, int, int]:
        return (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)


VIM = register_family(VimFamily())


# -- registered models -----------------------------------------------------------------------------
#: Vim-Ti's flags (bimamba v2, middle cls token, mean pool, RMSNorm, fp32 residual, abs pos
#: embed, divide-out), with width, depth and patch size scaled to 32x32 images and a CPU budget.
REFERENCE_CONFIG = VimConfig(img_size=32, patch_size=4, stride=4, num_classes=10, embed_dim=96, depth=6, d_state=16)

# The official registered variants all use bimamba v2, RMSNorm, an fp32 residual, absolute
# position embedding, the middle cls token and divide-out.
_TI = VimConfig(patch_size=16, stride=16, embed_dim=192, depth=24)
_S = replace(_TI, embed_dim=384)
_B = replace(_TI, embed_dim=768)
_OFFICIAL = {  # alias: (official name, config)
    "vim_tiny": ("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", _TI),
    "vim_tiny_stride8": ("vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                         replace(_TI, stride=8)),
    "vim_small": ("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2", _S),
    "vim_small_stride8": ("vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                          replace(_S, stride=8)),
    "vim_base": ("vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2", _B),
}
_VIM_CFG = imagenet_cfg(first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
for _alias, (_name, _config) in _OFFICIAL.items():
    register(VIM, _name, _config, _VIM_CFG, aliases=(_alias,))
register(VIM, REFERENCE_MODEL, REFERENCE_CONFIG, cifar_cfg(file=REFERENCE_WEIGHTS))
# tiny variants for tests (random weights; shapes of the fixtures in ../shared/fixtures)
register(VIM, "test_vim", VimConfig(img_size=32, patch_size=8, stride=8, embed_dim=48, depth=2, num_classes=10),
         cifar_cfg())
register(VIM, "test_vim_stride", VimConfig(img_size=32, patch_size=8, stride=4, embed_dim=32, depth=2,
                                           num_classes=10), cifar_cfg())
register(VIM, "test_vim_head_cls", VimConfig(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                                             num_classes=10, use_middle_cls_token=False), cifar_cfg())

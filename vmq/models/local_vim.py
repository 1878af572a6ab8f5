"""LocalVim (LocalMamba's Vim variant): vmq's own implementation, loading official checkpoints by their key names.

Semantics follow the official LocalVim (hunto/LocalMamba, ``lib/models/local_vim.py`` with
``MultiMamba`` and ``BiAttn``) as executed: the image zero-padded to whole patches; an optional
cls token at ``M // 2`` inserted before the position embedding; the 2-D rope (``rope.freqs_*``)
applied before every layer to the hidden states and the residual stream; Vim's blocks (fp32
residual, RMSNorm, ``norm_f``), then the cls token or the token mean. The mixer scans the tokens
in K per-layer orders (``h``, ``v``, windowed ``w2`` / ``w7``, their ``_flip``; see
:mod:`vmq.models.scan_orders`), each with its own conv1d, x_proj, dt_proj, A_log and D:
``in_proj``'s output is put in scan order with zero columns for window padding (the causal conv
makes the padding drive the state), the cls column at step ``c`` of every sequence; each
direction's gated output, back in token order, goes through the layer's shared channel gate
``attn``; the K results are summed, then ``out_proj``. Unlike the official code, a layer's K
scans run in one ``vmq.ops.multi_scan`` call and every projection is called as a module.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vmq.models.common import DropPath, PatchEmbed, RMSNorm, imagenet_cfg
from vmq.models.family import BenchGroups, Fold, register_family
from vmq.models.reference import cifar_cfg
from vmq.models.registry import register
from vmq.models.scan_orders import direction_order, insert_token, stack_orders
from vmq.models.vim import VimFamily
from vmq.ops.multi_scan import gather_steps, multi_direction_scan, multi_scan
from vmq.ops.scan import one_direction_scan

__all__ = ["LocalVimConfig", "LocalVisionMamba", "MultiMambaMixer", "BiAttn", "VisionRope", "Block",
           "LocalVimFamily", "LOCAL_VIM", "TINY_DIRECTIONS"]

#: The searched per-layer direction sets of LocalVim-T (and of the middle-cls variant).
TINY_DIRECTIONS: Tuple[Tuple[str, ...], ...] = tuple(tuple(s.split()) for s in (
    "h v_flip w7 w7_flip", "h_flip w2_flip w7 w7_flip", "h h_flip v w7", "h h_flip v v_flip", "h h_flip v v_flip",
    "h h_flip v v_flip", "h_flip v v_flip w7", "h_flip v v_flip w2_flip", "h h_flip v v_flip", "h h_flip v v_flip",
    "h v v_flip w2", "h v v_flip w2_flip", "h h_flip v_flip w7", "h_flip v v_flip w2", "h h_flip v v_flip",
    "h v w2 w2_flip", "v v_flip w2 w7", "h h_flip v w2", "h h_flip w2_flip w7", "v v_flip w2 w2_flip"))


@dataclass(frozen=True)
class LocalVimConfig:
    """Every architectural choice of a LocalVim model (defaults: LocalVim-T). Saved in packed files."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 20
    directions: Tuple[Tuple[str, ...], ...] = TINY_DIRECTIONS  # one set of scan orders per layer
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(embed_dim / 16), as in Mamba
    attn_act_ratio: float = 0.125  # BiAttn's reduced width: int(ratio * d_inner)
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    if_rope: bool = True
    if_rope_residual: bool = True
    pt_hw_seq_len: int = 14  # rope: the pretraining grid the angles are scaled to
    if_cls_token: bool = False
    use_middle_cls_token: bool = False
    if_abs_pos_embed: bool = True
    final_pool_type: str = "mean"  # used only without a cls token: "mean" or "none" (last token)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", tuple(tuple(str(d) for d in s) for s in self.directions))
        for name in ("img_size", "patch_size", "embed_dim", "depth", "d_state", "d_conv", "expand", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if len(self.directions) != self.depth or not all(self.directions):
            raise ValueError(f"directions needs one non-empty set per layer ({self.depth}), got {len(self.directions)}")
        for d in {d for s in self.directions for d in s}:
            direction_order(d, 1, 1)  # a ValueError for an unknown name
        if self.final_pool_type not in ("mean", "none"):
            raise ValueError(f"final_pool_type must be 'mean' or 'none', got {self.final_pool_type!r}")
        if self.if_cls_token and (self.if_rope or not self.use_middle_cls_token):
            raise ValueError("a LocalVim cls token goes in the middle (use_middle_cls_token=True) and without rope "
                             "(whose tables cover the patch tokens only)")

    d_inner = property(lambda self: self.expand * self.embed_dim)
    resolved_dt_rank = property(lambda self: self.dt_rank or math.ceil(self.embed_dim / 16))
    attn_dim = property(lambda self: int(self.d_inner * self.attn_act_ratio))
    stride = property(lambda self: self.patch_size)
    grid_size = property(lambda self: (-(-self.img_size // self.patch_size),) * 2)  # image padded to whole patches
    num_patches = property(lambda self: self.grid_size[0] * self.grid_size[1])
    num_tokens = property(lambda self: self.num_patches + (1 if self.if_cls_token else 0))
    cls_position = property(lambda self: self.num_patches // 2 if self.if_cls_token else None)

    def to_dict(self) -> dict:
        return {**asdict(self), "directions": [list(s) for s in self.directions]}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalVimConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LocalVim config keys: {', '.join(unknown)}")
        return cls(**d)


class PaddedPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed(dynamic_img_pad=True)``: the image zero-padded at the bottom and right to whole patches."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model expects {self.img_size}x{self.img_size}")
        pad = self.grid_size[0] * self.proj.stride[0] - self.img_size
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionRope(nn.Module):
    """2-D rotary embedding (official ``VisionRotaryEmbeddingFast(dim=D/2)``): token (i, j) of a G x G grid
    turns pair m of the first / second channel half by ``a_r = r / G * pt_seq_len * theta^(-4m / D)``, r = i / j."""

    def __init__(self, embed_dim: int, grid: int, pt_seq_len: int, theta: float = 10000.0):
        super().__init__()
        half = embed_dim // 2
        inv = 1.0 / theta ** (torch.arange(0, half, 2)[:half // 2].float() / half)
        pos = torch.arange(grid).float() / grid * pt_seq_len
        ang = (pos[:, None] * inv[None, :]).repeat_interleave(2, dim=-1)  # (G, D/2)
        full = torch.cat([ang[:, None].expand(grid, grid, -1), ang[None].expand(grid, grid, -1)], -1).flatten(0, 1)
        self.register_buffer("freqs_cos", full.cos())
        self.register_buffer("freqs_sin", full.sin())

    def forward(self, t: Tensor) -> Tensor:
        pairs = t.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return t * self.freqs_cos.to(t.device) + rotated * self.freqs_sin.to(t.device)


class BiAttn(nn.Module):
    """The channel gate shared by a layer's directions: ``y * sigmoid(W2 gelu(W1 mean_tokens(LN(y))))``."""

    def __init__(self, dim: int, reduced: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.global_reduce = nn.Linear(dim, reduced)
        self.channel_select = nn.Linear(reduced, dim)

    def forward(self, x: Tensor) -> Tensor:
        g = self.norm(x).mean(dim=1, keepdim=True)  # (b, 1, dim): over every token, cls included
        return x * torch.sigmoid(self.channel_select(F.gelu(self.global_reduce(g))))


class MultiMambaMixer(nn.Module):
    """K scan directions with official parameter names (``A_log_k``, ``D_k``, ``conv1d_k``, ``x_proj_k``, ``dt_proj_k``).

    ``scan``: "fused" (one ``multi_scan`` call, inference) or a one-direction scan of
    ``vmq.ops.one_direction_scan`` run through ``multi_direction_scan`` ("train": differentiable).
    """

    def __init__(self, cfg: LocalVimConfig, direction_names: Tuple[str, ...], scan: str = "fused"):
        super().__init__()
        d_model, d_inner, d_state = cfg.embed_dim, cfg.d_inner, cfg.d_state
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, cfg.resolved_dt_rank
        self.direction_names = tuple(direction_names)
        self.grid, self.cls_position = cfg.grid_size, cfg.cls_position
        self.scan = scan
        self._orders: Dict[Tuple[int, str], Tuple[List[Tensor], Tensor]] = {}
        # one tensor per direction (the official code shares one storage among the A_log_k on CPU)
        for k in range(len(self.direction_names)):
            setattr(self, f"A_log_{k}", nn.Parameter(torch.empty(d_inner, d_state)))
            setattr(self, f"D_{k}", nn.Parameter(torch.empty(d_inner)))
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        for k in range(len(self.direction_names)):
            setattr(self, f"conv1d_{k}", nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1))
            setattr(self, f"x_proj_{k}", nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj_{k}", nn.Linear(self.dt_rank, d_inner, bias=True))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.attn = BiAttn(d_inner, cfg.attn_dim)

    def direction(self, k: int) -> Tuple[nn.Module, nn.Module, nn.Module, Tensor, Tensor]:
        """(conv1d, x_proj, dt_proj, A_log, D) of direction k, looked up now (targets may have been replaced)."""
        return tuple(getattr(self, f"{n}_{k}") for n in ("conv1d", "x_proj", "dt_proj", "A_log", "D"))

    def scan_orders(self, seqlen: int, device: torch.device) -> Tuple[List[Tensor], Tensor]:
        """Each direction's order over the ``seqlen`` tokens (cls at step c, -1 for padding) and all of them stacked."""
        key = (seqlen, str(device))
        if key not in self._orders:
            (h, w), c = self.grid, self.cls_position
            if seqlen != h * w + (c is not None):
                raise ValueError(f"the mixer expects {h * w + (c is not None)} tokens, got {seqlen}")
            orders = [direction_order(name, h, w) for name in self.direction_names]
            if c is not None:
                orders = [insert_token(o, c, c) for o in orders]
            with torch.inference_mode(False):  # normal tensors even when first asked for under inference mode
                self._orders[key] = ([o.to(device) for o in orders], stack_orders(orders).to(device))
        return self._orders[key]

    def project(self, k: int, xs: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Direction k's ``(u, delta, B, C)`` from its x in scan order (b, d_inner, steps): ``u`` the causal
        conv + SiLU in scan order, ``delta`` dt_proj's output with its bias, before the softplus."""
        conv, x_proj, dt_proj, _, _ = self.direction(k)
        u = F.silu(conv(xs)[..., :xs.shape[-1]])
        x_dbl = x_proj(u.transpose(1, 2))  # (b, steps, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, dt_proj(dt).transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def direction_outputs(self, hidden: Tensor) -> Tensor:
        """Each direction's gated scan output in token order, (b, K, d_inner, L): BiAttn's inputs."""
        seqlen = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        orders, out_index = self.scan_orders(seqlen, hidden.device)
        steps = out_index.shape[1]
        parts = [self.project(k, gather_steps(x, order)) for k, order in enumerate(orders)]
        # shorter directions padded at the end (their outputs there are dropped)
        u, delta, B, C = ([t if t.shape[-1] == steps else F.pad(t, (0, steps - t.shape[-1])) for t in ts]
                          for ts in zip(*parts))
        dirs = [self.direction(k) for k in range(len(self.direction_names))]
        A = -torch.exp(torch.stack([d[3] for d in dirs]).float())
        D = torch.stack([d[4] for d in dirs]).float()
        if self.scan == "fused":
            y = multi_scan(u, delta, A, B, C, D=D, z=z, out_index=out_index, seqlen=seqlen, delta_softplus=True,
                           merge="none")
        else:
            y = multi_direction_scan(u, delta, A, B, C, D, None, z, None, out_index, seqlen, True, "none",
                                     scan=one_direction_scan(self.scan, hidden.device))
        return y.to(hidden.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        y = self.direction_outputs(hidden)
        out = self.attn(y[:, 0].transpose(1, 2))
        for k in range(1, y.shape[1]):
            out = out + self.attn(y[:, k].transpose(1, 2))
        return self.out_proj(out)


class Block(nn.Module):
    """Rope (the model's, held without registering it: its tables stay ``rope.*``) on both inputs
    -> add -> norm -> mixer; returns ``(mixer output, residual)`` like the official block."""

    def __init__(self, cfg: LocalVimConfig, directions: Tuple[str, ...], drop_path: float,
                 rope: Optional[VisionRope] = None):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.rope_residual = cfg.if_rope_residual
        self._rope = (rope,) if rope is not None else ()
        self.mixer = MultiMambaMixer(cfg, directions)
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_epsilon)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self._rope:
            hidden = self._rope[0](hidden)
            if residual is not None and self.rope_residual:
                residual = self._rope[0](residual)
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class LocalVisionMamba(nn.Module):
    def __init__(self, cfg: Optional[LocalVimConfig] = None, **overrides):
        super().__init__()
        if cfg is None or overrides:
            cfg = LocalVimConfig(**{**(cfg.to_dict() if cfg is not None else {}), **overrides})
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        if cfg.if_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.patch_embed = PaddedPatchEmbed(cfg)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rope = VisionRope(cfg.embed_dim, cfg.grid_size[0], cfg.pt_hw_seq_len) if cfg.if_rope else None
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        dpr = [0.0] + [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList([Block(cfg, cfg.directions[i], dpr[i], self.rope) for i in range(cfg.depth)])
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(cfg.embed_dim, cfg.norm_epsilon)
        self.reset_parameters()

    # -- initialisation (the official one: linears trunc_normal(0.02) with zero bias, dt_proj
    # included; out_proj kaiming-uniform / sqrt(depth); A_log = log(1..n); D = 1) --
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / (cfg.in_chans * cfg.patch_size ** 2)))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if cfg.if_cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if cfg.if_abs_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.layers:
            m = block.mixer
            for k in range(len(m.direction_names)):
                conv, _, _, A_log, D = m.direction(k)
                conv.reset_parameters()
                A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand(m.d_inner, -1))
                D.fill_(1.0)
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            m.out_proj.weight /= math.sqrt(cfg.depth)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding with the cls token inserted and the position embedding added (before any rope)."""
        x = self.patch_embed(x)
        pos = self.cfg.cls_position
        if pos is not None:
            x = torch.cat((x[:, :pos], self.cls_token.expand(x.shape[0], -1, -1), x[:, pos:]), dim=1)
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
        return hidden.mean(dim=1) if self.cfg.final_pool_type == "mean" else hidden[:, -1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# -- the family protocol ---------------------------------------------------------------------------
_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


class LocalVimFamily(VimFamily):
    """LocalVim for the engine: blocks ``layers.{i}.`` passing ``(hidden, residual)`` as Vim does
    (each block applies the rope to its inputs, so the block loop needs nothing more).

    Default targets: ``in_proj``, every ``x_proj_k`` and ``dt_proj_k``, ``out_proj``. Kept in
    floating point: BiAttn's two small linears (they act on one token-pooled vector per image and
    set a per-channel gate, which has no per-token activations to quantize and is sensitive to
    error), the depthwise convs, the norms, ``A_log_k`` / ``D_k`` (scan parameters) and the head.
    """

    name = "local_vim"
    model_class = LocalVisionMamba
    config_class = LocalVimConfig
    bench_groups = BenchGroups(
        order=("patch_embed", "rope", *_PROJECTIONS, "mixer other (conv, scan, gates)", "norms", "head"),
        remainders={"mixer": ("mixer other (conv, scan, gates)", _PROJECTIONS)})

    def checkpoint_filter(self, state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
        # official names are vmq's; the rope tables are a function of the config, so a checkpoint
        # saved without them gets the model's own
        rope = getattr(model, "rope", None)
        own = {} if rope is None else {f"rope.{k}": v for k, v in rope.state_dict().items()}
        return {**own, **state_dict} if own.keys() - state_dict.keys() else state_dict

    def default_targets(self) -> List[str]:
        return [r"re:layers\.\d+\.mixer\.(in_proj|x_proj_\d+|dt_proj_\d+|out_proj)$"]

    def smoothing_folds(self, block: Block) -> List[Fold]:
        # in_proj reads the block's norm (RMSNorm, no bias); dt_proj_k reads x_proj_k's first dt_rank outputs
        m = block.mixer
        return [Fold("mixer.in_proj", "norm")] + [Fold(f"mixer.dt_proj_{k}", f"mixer.x_proj_{k}", (0, m.dt_rank))
                                                  for k in range(len(m.direction_names))]

    def bench_group(self, module_name: str) -> Optional[str]:
        if module_name in ("patch_embed", "head", "rope"):
            return module_name
        m = re.fullmatch(r"layers\.\d+\.mixer(?:\.(in_proj|x_proj|dt_proj|out_proj)(?:_\d+)?)?", module_name)
        if m:
            return "mixer" if m.group(1) is None else m.group(1)
        if re.fullmatch(r"layers\.\d+\.norm|norm_f", module_name):
            return "norms"
        return None


LOCAL_VIM = register_family(LocalVimFamily())


# -- registered models -----------------------------------------------------------------------------
_TINY = LocalVimConfig()  # LocalVim-T: patch 16, width 192, depth 20, rope, mean pool
_TINY_MIDCLS = replace(_TINY, if_rope=False, if_rope_residual=False, if_cls_token=True, use_middle_cls_token=True)
# the second (effective) official definition of local_vim_small: every layer h h_flip w2 w2_flip
_SMALL = replace(_TINY, embed_dim=384, directions=(("h", "h_flip", "w2", "w2_flip"),) * 20)
_CFG = imagenet_cfg(first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
register(LOCAL_VIM, "local_vim_tiny", _TINY, _CFG, aliases=("localvim_tiny",))
register(LOCAL_VIM, "local_vim_tiny_middle_cls_token", _TINY_MIDCLS, _CFG,
         aliases=("localvim_tiny_middle_cls_token", "localvim_tiny_midcls"))
register(LOCAL_VIM, "local_vim_small", _SMALL, _CFG, aliases=("localvim_small",))
# tiny variants for tests (random weights; shapes of the fixtures localvim_micro / localvim_midcls_micro:
# layer i uses LocalVim-T's set of layer (0, 1, 2, 10)[i], which together cover all eight directions)
_MICRO_DIRECTIONS = tuple(TINY_DIRECTIONS[i] for i in (0, 1, 2, 10))
register(LOCAL_VIM, "test_local_vim", replace(_TINY, img_size=56, patch_size=4, embed_dim=48, depth=4,
                                              num_classes=10, directions=_MICRO_DIRECTIONS),
         cifar_cfg(input_size=(3, 56, 56)))
register(LOCAL_VIM, "test_local_vim_midcls", replace(_TINY_MIDCLS, img_size=64, patch_size=8, embed_dim=48, depth=4,
                                                     num_classes=10, directions=_MICRO_DIRECTIONS),
         cifar_cfg(input_size=(3, 64, 64)))

"""VMamba (MzeroMiko/VMamba): vmq's own implementation, loading official checkpoints through the
family's checkpoint filter.

Semantics follow the official classification model as executed (``VSSM`` with ``SS2D``):

* ``v05_noz`` (every v2 release, e.g. VMamba-T[s1l8], S/B[s2l15]): patch embed v2 (two strided
  3x3 convs), blocks ``x + op(norm(x))`` then ``x + mlp(norm2(x))``; SS2D without a gate:
  ``in_proj`` (d -> D), depthwise 3x3 conv + SiLU, the cross scan (row-major, column-major and
  their reverses, four directions with their own x_proj / dt_proj / A / D, summed),
  ``out_norm``, ``out_proj``; downsample v3 (a strided 3x3 conv, then LayerNorm);
* ``v0`` (the first release, "vanilla" VMamba-T/S/B): patch embed v1 (a 4x4 conv), no MLP,
  a gated SS2D (``in_proj`` d -> 2D = x | z, the same scan, ``out_norm``, ``* silu(z)``,
  ``out_proj``), downsample v1 (``PatchMerging2D``);
* head: LayerNorm, global average pool, ``classifier.head``. Every LayerNorm has eps 1e-5.

The official v2 model runs channel-first (``LayerNorm2d``, ``Linear2d`` 1x1 convs) and v0
channel-last; both compute the same numbers as vmq's channel-last modules
(:mod:`vmq.models.vmamba_parts`). Non-square inputs work (each stage scans its own H x W grid).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from vmq.models.common import imagenet_cfg
from vmq.models.family import BenchGroups, BlockIO, Fold, ModelFamily, register_family, scan_set
from vmq.models.reference import cifar_cfg
from vmq.models.registry import register
from vmq.models.vmamba_parts import (SS2D, Classifier, ConvDownsample, PatchMerging2D, Stage, VSSBlock, VSSMBase,
                                     drop_path_rates, hierarchical_blocks, make_patch_embed, official_to_vmq,
                                     reset_vssm_parameters)

__all__ = ["VMambaConfig", "VMamba", "VMambaFamily", "VMAMBA", "REFERENCE_CONFIG"]


@dataclass(frozen=True)
class VMambaConfig:
    """Every architectural choice of a VMamba model. Saved in packed files to rebuild the model."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    dims: Tuple[int, ...] = (96, 192, 384, 768)  # an int d means (d, 2d, 4d, 8d)
    depths: Tuple[int, ...] = (2, 2, 9, 2)
    ssm_d_state: int = 16
    ssm_ratio: float = 2.0
    dt_rank: int = 0  # 0: "auto", ceil(stage dim / 16)
    ssm_conv: int = 3
    ssm_conv_bias: bool = True
    forward_type: str = "v0"  # "v05_noz" (v2 releases) or "v0" (first release, gated)
    mlp_ratio: float = 0.0
    norm_layer: str = "ln"  # the official layout: "ln2d" channel-first (v2) or "ln" channel-last; same numbers
    patchembed_version: str = "v1"  # "v1" (4x4 conv) or "v2" (two strided 3x3 convs)
    downsample_version: str = "v1"  # "v1" (PatchMerging2D) or "v3" (strided 3x3 conv)
    norm_epsilon: float = 1e-5
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        depths = tuple(int(d) for d in self.depths)
        dims = self.dims
        dims = tuple(int(dims) * 2 ** i for i in range(len(depths))) if isinstance(dims, int) else tuple(map(int, dims))
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "dims", dims)
        for name, allowed in (("forward_type", ("v05_noz", "v0")), ("norm_layer", ("ln2d", "ln")),
                              ("patchembed_version", ("v1", "v2")), ("downsample_version", ("v1", "v3"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not depths or len(dims) != len(depths) or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"dims {dims} and depths {depths} must be positive, one per stage")
        if self.ssm_conv < 3 or self.ssm_conv % 2 == 0:
            raise ValueError(f"ssm_conv must be an odd kernel size of at least 3, got {self.ssm_conv}")
        if self.forward_type == "v0" and (self.ssm_conv != 3 or not self.ssm_conv_bias):
            raise ValueError("forward_type v0 has a 3x3 depthwise conv with bias (ssm_conv=3, ssm_conv_bias=True)")
        if self.ssm_d_state < 1 or self.ssm_ratio <= 0 or self.mlp_ratio < 0 or self.dt_rank < 0:
            raise ValueError("ssm_d_state must be >= 1, ssm_ratio > 0, mlp_ratio >= 0 and dt_rank >= 0")
        if self.patch_size < 2 or self.patch_size % 2 or self.patch_size > self.img_size:
            raise ValueError(f"patch_size must be even, at least 2 and at most img_size, got {self.patch_size}")

    def d_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    def stage_dt_rank(self, stage: int) -> int:
        return self.dt_rank or math.ceil(self.dims[stage] / 16)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # as JSON reads back

    @classmethod
    def from_dict(cls, d: dict) -> "VMambaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VMamba config keys: {', '.join(unknown)}")
        return cls(**d)


class VMamba(VSSMBase):
    """The VMamba classifier: ``patch_embed``, ``layers.{i}`` (``blocks.{j}`` and ``downsample``),
    ``classifier`` (see :mod:`vmq.models.vmamba_parts` for the modules)."""

    def __init__(self, cfg: Optional[VMambaConfig] = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = VMambaConfig(**overrides)
        elif overrides:
            cfg = VMambaConfig(**{**cfg.to_dict(), **overrides})
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        eps = cfg.norm_epsilon
        self.patch_embed = make_patch_embed(cfg.patchembed_version, cfg.in_chans, cfg.dims[0], cfg.patch_size, eps)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        stages = []
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            blocks = [VSSBlock(dim, self.make_op(cfg, i), int(dim * cfg.mlp_ratio), rates[i][j], eps)
                      for j in range(depth)]
            downsample = None
            if i < len(cfg.dims) - 1:
                make = PatchMerging2D if cfg.downsample_version == "v1" else ConvDownsample
                downsample = make(dim, cfg.dims[i + 1], eps)
            stages.append(Stage(blocks, downsample))
        self.layers = nn.ModuleList(stages)
        self.classifier = Classifier(cfg.dims[-1], cfg.num_classes, eps)
        reset_vssm_parameters(self)

    @staticmethod
    def make_op(cfg: VMambaConfig, stage: int) -> SS2D:
        return SS2D(cfg.dims[stage], cfg.d_inner(stage), cfg.ssm_d_state, cfg.stage_dt_rank(stage), cfg.ssm_conv,
                    cfg.ssm_conv_bias, gated=cfg.forward_type == "v0", eps=cfg.norm_epsilon)


# -- the family protocol ---------------------------------------------------------------------------
_PROJECTIONS = ("in_proj", "x_proj", "dt_projs", "out_proj")
_OP_REST = "ss2d other (conv, scan, out_norm)"


class VMambaFamily(ModelFamily):
    """VMamba for the engine: blocks ``layers.{i}.blocks.{j}.`` and ``layers.{i}.downsample.``, in
    order, passing ``(x,)`` with ``x`` (batch, H, W, C) channel-last.

    Default targets: every SS2D projection (``in_proj``, ``x_proj.{k}``, ``dt_projs.{k}``,
    ``out_proj``), the MLP's ``fc1`` / ``fc2`` and the downsample projection (v3 ``proj``, v1
    ``reduction``). They stay in floating point: the patch-embed convs (3 input channels, a
    small share of the compute and the most sensitive layer), the depthwise conv2d (9 taps per
    channel, no GEMM), every LayerNorm, the scan's parameters ``A_logs``, ``Ds``,
    ``dt_projs_bias`` (read by the fp32 scan), and the classifier head (one pooled token per
    image; conventionally kept in floating point).
    """

    name = "vmamba"
    model_class = VMamba
    config_class = VMambaConfig
    bench_groups = BenchGroups(
        order=("patch_embed", *_PROJECTIONS, _OP_REST, "mlp", "downsample", "norms", "head"),
        remainders={"op": (_OP_REST, _PROJECTIONS)})

    def checkpoint_filter(self, state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
        return official_to_vmq(state_dict)

    def blocks(self, model: VSSMBase) -> List[Tuple[str, nn.Module]]:
        return hierarchical_blocks(model)

    def embed(self, model: VSSMBase, images: Tensor) -> BlockIO:
        return (model.patch_embed(images),)

    def run_block(self, block: nn.Module, io: BlockIO) -> BlockIO:
        return (block(io[0]),)

    def block_output(self, io: BlockIO) -> Tensor:
        return io[0]

    def head(self, model: VSSMBase, io: BlockIO) -> Tensor:
        return model.classifier.head(model.classifier.pool(io[0]))

    def default_targets(self) -> List[str]:
        return [r"re:layers\.\d+\.blocks\.\d+\.(op\.(in_proj|x_proj\.\d+|dt_projs\.\d+|out_proj)|mlp\.fc[12])$",
                r"re:layers\.\d+\.downsample\.(proj|reduction)$"]

    def smoothing_folds(self, block: nn.Module) -> List[Fold]:
        # in_proj reads the block's norm; dt_projs.k the first dt_rank outputs of x_proj.k; out_proj
        # reads out_norm unless the gate multiplies in between; fc1 reads norm2; the v1 downsample's
        # reduction reads its norm (the v3 projection reads the block output: nothing to fold into)
        if isinstance(block, PatchMerging2D):
            return [Fold("reduction", "norm")]
        if not isinstance(block, VSSBlock):
            return []
        op = block.op
        folds = [Fold("op.in_proj", "norm")]
        folds += [Fold(f"op.dt_projs.{k}", f"op.x_proj.{k}", (0, op.dt_rank)) for k in range(len(op.x_proj))]
        if not op.gated:
            folds.append(Fold("op.out_proj", "op.out_norm"))
        if block.has_mlp:
            folds.append(Fold("mlp.fc1", "norm2"))
        return folds

    @contextlib.contextmanager
    def scan_implementation(self, model: nn.Module, impl: str) -> Iterator[None]:
        with scan_set([m for m in model.modules() if isinstance(m, SS2D)], impl):
            yield

    def bench_group(self, module_name: str) -> Optional[str]:
        if module_name == "patch_embed":
            return module_name
        if module_name.startswith("classifier."):
            return {"classifier.head": "head", "classifier.norm": "norms"}.get(module_name)
        if re.fullmatch(r"layers\.\d+\.downsample", module_name):
            return "downsample"
        m = re.fullmatch(r"layers\.\d+\.blocks\.\d+\.(?:(mlp)|(norm2?)|op(?:\.(in_proj|out_proj)"
                         r"|\.(x_proj|dt_projs)\.\d+)?)", module_name)
        if m is None:
            return None
        return m.group(1) or ("norms" if m.group(2) else None) or m.group(3) or m.group(4) or "op"

    def input_size(self, model: VSSMBase) -> Tuple[int, int, int]:
        return (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)


VMAMBA = register_family(VMambaFamily())


# -- registered models -----------------------------------------------------------------------------
# the official configs (classification/configs/vssm/*.yaml): v2 releases and the first release (v0)
_V2 = VMambaConfig(dims=96, depths=(2, 2, 8, 2), ssm_d_state=1, ssm_ratio=1.0, ssm_conv=3, ssm_conv_bias=False,
                   forward_type="v05_noz", mlp_ratio=4.0, norm_layer="ln2d", patchembed_version="v2",
                   downsample_version="v3", drop_path_rate=0.2)
_V0 = VMambaConfig(dims=96, depths=(2, 2, 9, 2), ssm_d_state=16, ssm_ratio=2.0, forward_type="v0", mlp_ratio=0.0,
                   norm_layer="ln", patchembed_version="v1", downsample_version="v1", drop_path_rate=0.2)
_OFFICIAL = {  # yaml name: (config, aliases: vmq's short name, the official builder function's name)
    "vmambav2v_tiny_224": (_V2, ("vmamba_tiny", "vmamba_tiny_s1l8")),
    "vmambav2_tiny_224": (replace(_V2, ssm_ratio=2.0, depths=(2, 2, 5, 2)), ("vmamba_tiny_s2l5",)),
    "vmambav2_small_224": (replace(_V2, ssm_ratio=2.0, depths=(2, 2, 15, 2), drop_path_rate=0.3),
                           ("vmamba_small", "vmamba_small_s2l15")),
    "vmambav2_base_224": (replace(_V2, dims=(128, 256, 512, 1024), ssm_ratio=2.0, depths=(2, 2, 15, 2),
                                  drop_path_rate=0.6), ("vmamba_base", "vmamba_base_s2l15")),
    "vmambav0_tiny_224": (_V0, ("vanilla_vmamba_tiny",)),
    "vmambav0_small_224": (replace(_V0, depths=(2, 2, 27, 2), drop_path_rate=0.3), ("vanilla_vmamba_small",)),
    "vmambav0_base_224": (replace(_V0, dims=(128, 256, 512, 1024), depths=(2, 2, 27, 2), drop_path_rate=0.6),
                          ("vanilla_vmamba_base",)),
}
_VMAMBA_CFG = imagenet_cfg(first_conv="patch_embed.0", classifier="classifier.head", license="mit")
for _name, (_config, _aliases) in _OFFICIAL.items():
    register(VMAMBA, _name, _config, _VMAMBA_CFG, aliases=_aliases)

# tiny variants for tests (random weights; the shapes of the fixtures in ../shared/fixtures/vmamba_micro*)
_MICRO = dict(img_size=64, num_classes=10, dims=8, depths=(1, 1, 2, 1))
_TEST_CFG = cifar_cfg(input_size=(3, 64, 64), first_conv="patch_embed.0", classifier="classifier.head")
register(VMAMBA, "test_vmamba", replace(_V2, **_MICRO), _TEST_CFG)
register(VMAMBA, "test_vmamba_s2", replace(_OFFICIAL["vmambav2_small_224"][0], **_MICRO), _TEST_CFG)
register(VMAMBA, "test_vmamba_v0", replace(_V0, **_MICRO), _TEST_CFG)

#: vmq's VMamba reference model: VMamba-T[s1l8]'s flags (v05_noz, d_state 1, ssm_ratio 1, MLP ratio 4,
#: patch embed v2, downsample v3) sized for 32x32 CIFAR-10 (see vmq/assets/MODEL_CARD.md)
REFERENCE_CONFIG = replace(_V2, img_size=32, num_classes=10, dims=(32, 64, 128, 256), depths=(2, 2, 4, 1),
                           drop_path_rate=0.1)
register(VMAMBA, "vmamba_ref_cifar10", REFERENCE_CONFIG,
         cifar_cfg(file="vmamba_ref_cifar10.safetensors", first_conv="patch_embed.0", classifier="classifier.head"))

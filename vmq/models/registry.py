"""Vim models in timm's registry: official long names, short aliases, vmq's reference model, test variants.

``import vmq.models`` registers them, after which ``timm.create_model(name, num_classes=...)``
builds any of them. vmq cannot download official weights: ``pretrained=True`` works only for
the reference model that ships inside the package.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Dict, List

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from timm.models import generate_default_cfgs, register_model

from vmq.errors import VmqError
from vmq.models.reference import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, REFERENCE_CONFIG
from vmq.models.vim import VimConfig, VisionMamba

REFERENCE_MODEL = "vim_ref_cifar10"
REFERENCE_WEIGHTS = "vim_ref_cifar10.safetensors"

# The official registered variants: every one uses bimamba v2, RMSNorm, an fp32 residual,
# absolute position embedding, the middle cls token and divide-out.
_TI = VimConfig(patch_size=16, stride=16, embed_dim=192, depth=24)
_S = replace(_TI, embed_dim=384)
_B = replace(_TI, embed_dim=768)

ARCHS: Dict[str, VimConfig] = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _TI,
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": replace(_TI, stride=8),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": _S,
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": replace(_S, stride=8),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": _B,
    REFERENCE_MODEL: REFERENCE_CONFIG,
    # tiny variants for tests (random weights; shapes of the fixtures in ../shared/fixtures)
    "test_vim": VimConfig(img_size=32, patch_size=8, stride=8, embed_dim=48, depth=2, num_classes=10),
    "test_vim_stride": VimConfig(img_size=32, patch_size=8, stride=4, embed_dim=32, depth=2, num_classes=10),
    "test_vim_head_cls": VimConfig(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10,
                                   use_middle_cls_token=False),
}

ALIASES: Dict[str, str] = {
    "vim_tiny": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_tiny_stride8": "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small_stride8": "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_base": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}


def _imagenet_cfg(**kw) -> dict:
    # The official evaluation: DeiT-style resize to 224/0.875 then center crop 224, bicubic.
    return {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": 1000,
            "label_names": tuple(ImageNetInfo().label_names()),  # WordNet ids, the ImageNet folder names
            "fixed_input_size": True, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **kw}


def _cifar_cfg(**kw) -> dict:
    return {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
            "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "num_classes": 10, "label_names": CIFAR10_CLASSES,
            "fixed_input_size": True, "first_conv": "patch_embed.proj", "classifier": "head", **kw}


def _cfg_for(name: str) -> dict:
    if name == REFERENCE_MODEL:
        return _cifar_cfg(file=REFERENCE_WEIGHTS)
    if name.startswith("test_"):
        return _cifar_cfg()
    return _imagenet_cfg()


default_cfgs = generate_default_cfgs({name: _cfg_for(name) for name in list(ARCHS) + list(ALIASES)})


def reference_weights_path() -> Path:
    return Path(str(resources.files("vmq.assets") / REFERENCE_WEIGHTS))


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def model_names() -> List[str]:
    return list(ARCHS) + list(ALIASES)


def config_for(name: str) -> VimConfig:
    cname = canonical_name(name)
    if cname not in ARCHS:
        import difflib

        close = difflib.get_close_matches(name, model_names(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(ALIASES)}, {REFERENCE_MODEL}, ..."
        raise VmqError(f"unknown model {name!r}{hint}")
    return ARCHS[cname]


def _build(variant: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
           cache_dir=None, **overrides) -> VisionMamba:
    """Build a registered Vim. Overrides are VimConfig fields (timm's img_size/in_chans included)."""
    cfg = config_for(variant)
    try:
        model = VisionMamba(cfg, **overrides)
    except TypeError as exc:
        raise VmqError(f"{variant}: {exc}") from None
    model.pretrained_cfg = model.default_cfg = dict(default_cfgs[variant].default.to_dict())
    model.pretrained_cfg["num_classes"] = model.num_classes
    model.pretrained_cfg["input_size"] = (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    if pretrained:
        if canonical_name(variant) != REFERENCE_MODEL:
            raise VmqError(f"{variant}: vmq cannot download pretrained weights; pass a checkpoint file instead")
        from vmq.models.checkpoint import load_checkpoint

        load_checkpoint(model, reference_weights_path(), model_name=variant)
    return model


def _register(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs) -> VisionMamba:
        return _build(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    register_model(entry)


for _name in model_names():
    _register(_name)

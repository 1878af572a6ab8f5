"""Registered models: name -> (family, config, pretrained config), entered in timm's registry.

A family file calls :func:`register` for each of its models (official long names, short aliases,
tiny ``test_*`` variants); ``timm.create_model(name, **overrides)`` then builds it.
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` loads a
local checkpoint file through the family's checkpoint filter (with vmq's safe reader, never
unpickling code); without a file, ``pretrained=True`` works only for models whose weights ship
inside the package (the reference model). vmq downloads nothing.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from vmq.errors import VmqError
from vmq.models.checkpoint import StateDict, load_state_dict_strict, read_state_dict
from vmq.models.family import ModelFamily


@dataclass(frozen=True)
class Entry:
    family: ModelFamily
    config: Any
    pretrained_cfg: dict


MODELS: Dict[str, Entry] = {}
ALIASES: Dict[str, str] = {}


def register(family: ModelFamily, name: str, config: Any, pretrained_cfg: dict,
             aliases: tuple = ()) -> None:
    """Register ``name`` (and its ``aliases``) with vmq and timm."""
    if name in MODELS or name in ALIASES:
        raise ValueError(f"model {name!r} is registered twice")
    MODELS[name] = Entry(family, config, dict(pretrained_cfg))
    for alias in aliases:
        ALIASES[alias] = name
    for n in (name, *aliases):
        _register_timm(n)


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def model_names() -> List[str]:
    return list(MODELS) + list(ALIASES)


def entry_for(name: str) -> Entry:
    cname = canonical_name(name)
    if cname not in MODELS:
        close = difflib.get_close_matches(name, model_names(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(list(ALIASES)[:6])}, ..."
        raise VmqError(f"unknown model {name!r}{hint}")
    return MODELS[cname]


def config_for(name: str) -> Any:
    return entry_for(name).config


def family_for(name: str) -> ModelFamily:
    return entry_for(name).family


def shipped_weights(name: str) -> Optional[Path]:
    """The weights file shipped inside the package for ``name``, if any."""
    file = entry_for(name).pretrained_cfg.get("file")
    return Path(str(resources.files("vmq.assets") / file)) if file else None


def reference_models() -> List[str]:
    """The registered models whose trained weights ship with vmq (trained on CIFAR-10, which ships too)."""
    return [name for name, entry in MODELS.items() if entry.pretrained_cfg.get("file")]


def fitting_models(sd: StateDict) -> List[str]:
    """Registered model names whose parameter names and shapes match ``sd`` (num_classes aside)."""
    fits = []
    for name, entry in MODELS.items():
        with torch.device("meta"):
            model = entry.family.build(entry.config)
            filtered = entry.family.checkpoint_filter(sd, model)
            head = checkpoint_num_classes(entry, filtered)
            if head is not None and head != getattr(model, "num_classes", head):
                model = entry.family.build(entry.config, num_classes=head)
        ref = model.state_dict()
        if set(ref) == set(filtered) and all(tuple(ref[k].shape) == tuple(filtered[k].shape) for k in ref):
            fits.append(name)
    return fits


def checkpoint_num_classes(entry: Entry, sd: StateDict) -> Optional[int]:
    """The classes of ``sd``'s classifier (the pretrained config's ``classifier`` layer), if it has one."""
    head = sd.get(f"{entry.pretrained_cfg.get('classifier', 'head')}.weight")
    return int(head.shape[0]) if head is not None else None


def load_checkpoint(model: nn.Module, path: Union[str, Path], family: ModelFamily, model_name: Optional[str] = None,
                    state_dict: Optional[StateDict] = None) -> None:
    """Load ``path`` (or its already-read ``state_dict``) into ``model`` through the family's
    checkpoint filter, strictly; a mismatch raises a VmqError naming a registered model that fits."""
    sd = read_state_dict(path) if state_dict is None else state_dict
    load_state_dict_strict(model, family.checkpoint_filter(sd, model), f"{path}", model_name or type(model).__name__,
                           hint=lambda: fitting_models(sd))


def create(name: str, pretrained: bool = False, pretrained_cfg_overlay: Optional[dict] = None,
           **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` are config fields (timm's ``num_classes``, ``img_size``...).

    With ``pretrained``: the file of ``pretrained_cfg_overlay`` (a local checkpoint), else the
    weights that ship with vmq for this model.
    """
    cname = canonical_name(name)
    entry = entry_for(name)
    try:
        model = entry.family.build(entry.config, **overrides)
    except (TypeError, ValueError) as exc:
        raise VmqError(f"{name}: {exc}") from None
    cfg = dict(entry.pretrained_cfg, **(pretrained_cfg_overlay or {}))
    cfg["num_classes"] = getattr(model, "num_classes", cfg.get("num_classes"))
    cfg["input_size"] = entry.family.input_size(model)
    cfg["architecture"] = cname
    model.pretrained_cfg = model.default_cfg = cfg
    model.vmq_name = cname
    if pretrained:
        file = (pretrained_cfg_overlay or {}).get("file")
        path = Path(file) if file else shipped_weights(cname)
        if path is None:
            raise VmqError(f"{name}: vmq cannot download pretrained weights; pass a checkpoint file "
                           "(pretrained_cfg_overlay=dict(file=PATH), or --checkpoint)")
        load_checkpoint(model, path, entry.family, cname)
    return model


# timm's register_model reads a module's `default_cfgs` for the pretrained config of each name
default_cfgs: Dict[str, Any] = {}


def _register_timm(name: str) -> None:
    def entry(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
              **overrides) -> nn.Module:
        del pretrained_cfg, cache_dir  # vmq's configs are its own; nothing is downloaded
        return create(name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    cfg = {k: v for k, v in MODELS[canonical_name(name)].pretrained_cfg.items() if k != "file"}
    default_cfgs.update(generate_default_cfgs({name: cfg}))
    register_model(entry)


__all__ = ["checkpoint_num_classes", "reference_models", "register", "canonical_name", "model_names", "entry_for", "config_for", "family_for", "shipped_weights",
           "fitting_models", "load_checkpoint", "create", "MODELS", "ALIASES"]

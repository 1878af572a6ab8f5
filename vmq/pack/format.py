"""The packed file: one safetensors file that rebuilds a compressed model on its own.

For each runtime layer ``<layer>`` (:mod:`vmq.layers`), its kind's tensors under
``<layer>.<name>`` (compressed-tensors naming: ``weight``, ``weight_packed``, ``weight_scale``,
``input_scale``, ``weight_codes``, ... as each kind documents) and ``<layer>.weight_shape``, int64
(2,), the (out, in) shape of the linear layer it replaces. Every other tensor of the model is
stored under its own name (norm weights already hold folded smoothing scales).
``__metadata__["vmq"]`` is a JSON string: ``format``, ``format_version``, ``vmq_version``,
``model`` (registered name, family and full config), ``recipe`` (resolved), ``layers`` (each
layer's ``kind`` and spec) and ``results`` (what the command measured).

The container knows no layer's internals: the kind recorded for a layer picks its class in
:data:`vmq.layers.KINDS`, which rebuilds it from its spec and tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vmq import __version__
from vmq.errors import VmqError
from vmq.fileio import atomic_path
from vmq.layers import KINDS, runtime_layers
from vmq.models import entry_for, family_of, model_names
from vmq.modules import set_module

FORMAT = "vmq.packed"
FORMAT_VERSION = 1


def read_metadata(path: Union[str, Path]) -> Optional[dict]:
    """The vmq metadata of a safetensors file, or None when it is not a vmq packed file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vmq")
    except Exception:
        return None
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_packed(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a vmq packed file (by its metadata, whatever its suffix)."""
    p = Path(path)
    return p.is_file() and read_metadata(p) is not None


def save_packed(model: nn.Module, path: Union[str, Path], recipe: dict, results: Optional[dict] = None) -> None:
    """Write ``model`` (with runtime layers) atomically to ``path``."""
    quantized = dict(runtime_layers(model))
    if not quantized:
        raise VmqError("the model has no quantized layer to pack")
    if getattr(model, "vmq_name", None) not in model_names():
        raise VmqError("the model has no registered name (model.vmq_name); a packed file must name its model")
    family = family_of(model)
    tensors: Dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{n}." for n in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value.detach().cpu().contiguous()
    layers = {}
    for name, q in quantized.items():
        for key, t in q.packed_tensors().items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features], dtype=torch.int64,
                                                       device="cpu")
        layers[name] = {"kind": q.kind, **q.spec()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vmq_version": __version__,
        "model": {"name": model.vmq_name, "family": family.name,
                  "config": family.config_to_dict(family.config_of(model))},
        "recipe": recipe,
        "layers": layers,
        "results": results or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})


def load_packed(path: Union[str, Path]) -> Tuple[nn.Module, dict]:
    """Rebuild the compressed model from a packed file alone; returns ``(model, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise VmqError(f"packed file not found: {path}")
    meta = read_metadata(path)
    if meta is None:
        raise VmqError(f"{path} is not a vmq packed file (no vmq metadata); a checkpoint goes to --checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise VmqError(f"{path}: packed format version {meta.get('format_version')} is not supported "
                       f"(this vmq reads version {FORMAT_VERSION})")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise VmqError(f"cannot read {path}: {type(exc).__name__}") from None
    try:
        name = meta["model"]["name"]
        entry = entry_for(name)
        family = entry.family
        if meta["model"].get("family", family.name) != family.name:
            raise VmqError(f"{name} is a {family.name} model, the file says {meta['model']['family']}")
        stored = family.config_to_dict(family.config_from_dict(meta["model"]["config"]))
        base = family.config_to_dict(entry.config)
        overrides = {k: v for k, v in stored.items() if base.get(k) != v}
        model = timm.create_model(name, pretrained=False, **overrides)
        layer_specs = dict(meta["layers"])
    except VmqError as exc:
        raise VmqError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VmqError(f"{path}: broken vmq metadata ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    modules = dict(model.named_modules())
    for lname, spec in layer_specs.items():
        set_module(model, lname, _load_layer(path, name, lname, spec, modules.get(lname), tensors))
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise VmqError(f"{path}: tensors do not fit {name}: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.startswith(tuple(f"{n}." for n in layer_specs))]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise VmqError(f"{path}: tensors do not fit {name}: {what}")
    return model.eval(), meta


def _load_layer(path: Path, model_name: str, lname: str, spec: dict, target: Optional[nn.Module], tensors: dict):
    """The runtime layer ``lname`` rebuilt from ``spec`` and its tensors (popped from ``tensors``)."""
    if not isinstance(target, nn.Linear):
        raise VmqError(f"{path}: {model_name} has no linear layer {lname}")
    kind = spec.get("kind", "int") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise VmqError(f"{path}: layer {lname} has unknown kind {kind!r} (this vmq knows {', '.join(KINDS)})")
    prefix = f"{lname}."
    local = _Named(f"tensor {prefix}", {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    spec = _Named("metadata key ", spec)
    try:
        shape = tuple(int(v) for v in local.pop("weight_shape").tolist())
        if shape != (target.out_features, target.in_features):
            raise VmqError(f"{path}: {lname} is {shape} in the file but {model_name} has "
                           f"{(target.out_features, target.in_features)}")
        layer = KINDS[kind].from_packed(spec, local, shape)
    except _Missing as exc:
        raise VmqError(f"{path}: quantized layer {lname} lacks {exc.args[0]}") from None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise VmqError(f"{path}: quantized layer {lname}: {exc}".splitlines()[0]) from None
    for k in [k for k in tensors if k.startswith(prefix)]:
        del tensors[k]
    return layer


class _Missing(KeyError):
    pass


class _Named(dict):
    """A dict whose missing keys raise :class:`_Missing` naming what is missing."""

    def __init__(self, label: str, items: dict):
        super().__init__(items)
        self.label = label

    def __getitem__(self, key):
        if key not in self:
            raise _Missing(f"{self.label}{key}")
        return super().__getitem__(key)

    def pop(self, key, *default):
        if key not in self and not default:
            raise _Missing(f"{self.label}{key}")
        return super().pop(key, *default)


__all__ = ["FORMAT", "FORMAT_VERSION", "save_packed", "load_packed", "read_metadata", "is_packed"]

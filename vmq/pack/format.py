"""The packed file: one safetensors file that rebuilds a compressed model on its own.

For each runtime layer ``<layer>`` (:mod:`vmq.layers`), its kind's tensors under
``<layer>.<name>`` (compressed-tensors naming: ``weight``, ``weight_packed``, ``weight_scale``,
``input_scale``, ``weight_codes``, ... as each kind documents) and ``<layer>.weight_shape``, int64
(2,), the (out, in) shape of the linear layer it replaces. Every other tensor of the model is
stored under its own name (norm weights already hold folded smoothing scales).
``__metadata__["vmq"]`` is a JSON string: ``format`` (``vmq.packed``), ``format_version``
(``"MAJOR.MINOR"``, :data:`FORMAT_VERSION`), ``vmq_version``, ``model`` (registered name, family
and full config), ``recipe`` (resolved), ``layers`` (each layer's ``kind`` and spec), ``results``
(what the command measured) and ``payload_sha256`` (:func:`vmq.safefile.payload_sha256`: every
tensor's name, dtype, shape and bytes).

Loading checks, in order and before building anything: the safetensors header
(:func:`vmq.safefile.read_header`), the format (a newer major version is refused; version 1 files,
which have no checksum, still load), the payload's SHA-256 (unless ``verify=False``), the size of
the model the metadata describes (built on the meta device: at most :data:`MAX_EXPANSION` times the
file in fp32), then each layer's kind and tensors.

The container knows no layer's internals: the kind recorded for a layer picks its class in
:data:`vmq.layers.KINDS`, which rebuilds it from its spec and tensors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vmq import __version__
from vmq.errors import VmqError
from vmq.fileio import atomic_path
from vmq.layers import KINDS, runtime_layers
from vmq.models import entry_for, family_of, model_names
from vmq.modules import set_module
from vmq.safefile import SafeHeader, payload_sha256, read_header

FORMAT = "vmq.packed"
#: MAJOR.MINOR. A reader loads every minor version of the majors it knows (a minor version only adds
#: metadata that older readers may ignore); a newer major is refused. 1: the first format (an integer
#: in the file, no checksum; still read); 2.0: adds ``payload_sha256``.
FORMAT_VERSION = "2.0"
READS_MAJOR = 2
#: a packed file may describe a model of at most this many times its own size in fp32 (0.5 bit per
#: weight); checked on the meta device before any weight is allocated
MAX_EXPANSION = 64
_STATS_FORMAT = "vmq.calibration"


def parse_version(value) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a recorded ``format_version`` (``1`` or ``"M.N"``), or None when malformed."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return 1, 0
    if isinstance(value, str) and len(value) <= 16:
        parts = value.split(".")
        if len(parts) == 2 and all(p.isdigit() and p.isascii() for p in parts):
            return int(parts[0]), int(parts[1])
    return None


def read_metadata(path: Union[str, Path]) -> Optional[dict]:
    """The vmq metadata of a safetensors file, or None when it is not a (readable) vmq packed file."""
    try:
        return packed_meta(read_header(path), Path(path))
    except VmqError:
        return None


def is_packed(path: Union[str, Path]) -> bool:
    """Whether ``path`` is meant as a vmq packed file (by its metadata, whatever its suffix), even one
    that :func:`load_packed` will refuse (broken metadata, a newer format), so that it says why."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        raw = read_header(p).metadata.get("vmq")
    except VmqError:
        return False
    if raw is None:
        return False
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return not isinstance(meta, dict) or meta.get("format") == FORMAT


def packed_meta(header: SafeHeader, path: Path) -> dict:
    """The checked vmq metadata of a packed file, its format version included."""
    raw = header.metadata.get("vmq")
    if raw is None:
        raise VmqError(f"{path} is not a vmq packed file (no vmq metadata); a checkpoint goes to --checkpoint")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise VmqError(f"{path}: broken vmq metadata (not a JSON object)")
    if meta.get("format") == _STATS_FORMAT:
        raise VmqError(f"{path} is a vmq calibration stats file (from `vmq calibrate`), not a packed file")
    if meta.get("format") != FORMAT:
        raise VmqError(f"{path} is not a vmq packed file (its vmq metadata names format "
                       f"{str(meta.get('format'))[:40]!r})")
    version = parse_version(meta.get("format_version"))
    if version is None:
        raise VmqError(f"{path}: broken vmq metadata (format_version {str(meta.get('format_version'))[:20]!r} "
                       "is not MAJOR.MINOR)")
    if version[0] > READS_MAJOR:
        raise VmqError(f"{path} was written by vmq {str(meta.get('vmq_version'))[:20]}, packed format version "
                       f"{version[0]}.{version[1]}; this vmq ({__version__}) reads up to {READS_MAJOR}.x: upgrade vmq")
    if version[0] >= 2:
        digest = meta.get("payload_sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise VmqError(f"{path}: broken vmq metadata (format {version[0]}.{version[1]} needs payload_sha256, "
                           "64 hex digits)")
    return meta


def packed_state(module: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """``module``'s tensors as a packed file stores them (CPU, contiguous) and its runtime layers' specs.

    Each runtime layer ``<layer>`` gives its kind's tensors under ``<layer>.<name>`` and
    ``<layer>.weight_shape``, and its ``{"kind", **spec}``; every other tensor of the state dict
    keeps its name. The packed file holds this for the model, a progress record for one block."""
    quantized = dict(runtime_layers(module))
    prefixes = tuple(f"{n}." for n in quantized)
    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()
               if not key.startswith(prefixes)}
    layers = {}
    for name, q in quantized.items():
        for key, t in q.packed_tensors().items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features], dtype=torch.int64,
                                                       device="cpu")
        layers[name] = {"kind": q.kind, **q.spec()}
    return tensors, layers


def save_packed(model: nn.Module, path: Union[str, Path], recipe: dict, results: Optional[dict] = None) -> None:
    """Write ``model`` (with runtime layers) atomically to ``path``."""
    quantized = dict(runtime_layers(model))
    if not quantized:
        raise VmqError("the model has no quantized layer to pack")
    if getattr(model, "vmq_name", None) not in model_names():
        raise VmqError("the model has no registered name (model.vmq_name); a packed file must name its model")
    family = family_of(model)
    tensors, layers = packed_state(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vmq_version": __version__,
        "model": {"name": model.vmq_name, "family": family.name,
                  "config": family.config_to_dict(family.config_of(model))},
        "recipe": recipe,
        "layers": layers,
        "results": results or {},
        "payload_sha256": payload_sha256(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})


def load_packed(path: Union[str, Path], verify: bool = True) -> Tuple[nn.Module, dict]:
    """Rebuild the compressed model from a packed file alone; returns ``(model, metadata)``.

    The header is checked before anything is read (:func:`vmq.safefile.read_header`), the payload
    against the recorded SHA-256 unless ``verify`` is False. The returned metadata gains
    ``payload_check``: ``verified``, ``skipped`` or ``absent`` (format 1 files record none)."""
    path = Path(path)
    if not path.is_file():
        raise VmqError(f"packed file not found: {path}")
    header = read_header(path, "packed file ")
    meta = packed_meta(header, path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise VmqError(f"cannot read {path}: {type(exc).__name__}") from None
    meta["payload_check"] = check_payload(path, meta, tensors if verify else None)
    model, name, layer_specs = _build_model(path, meta, header.file_size)
    load_runtime_state(model, layer_specs, tensors, str(path), name)
    return model.eval(), meta


def load_runtime_state(module: nn.Module, specs: Dict[str, Any], tensors: Dict[str, Tensor], where: str,
                       what: str) -> None:
    """Make ``module`` (floating point, as built) what :func:`packed_state` gave: each layer of
    ``specs`` rebuilt as its runtime kind from its tensors (on the device of the layer it
    replaces), every other tensor loaded by name; anything missing or left over is an error.

    The packed file's loader and ``--resume`` (a recorded block) share it; ``where`` begins
    error messages and ``what`` names ``module`` in them. Consumes ``tensors``."""
    modules = dict(module.named_modules())
    for lname, spec in specs.items():
        target = modules.get(lname)
        layer = _load_layer(where, what, lname, spec, target, tensors)
        set_module(module, lname, layer.to(target.weight.device))
    try:
        result = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise VmqError(f"{where}: tensors do not fit {what}: {str(exc).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.startswith(tuple(f"{n}." for n in specs))]
    if missing or result.unexpected_keys:
        found = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise VmqError(f"{where}: tensors do not fit {what}: {found}")


def check_payload(path: Path, meta: dict, tensors: Optional[Dict[str, torch.Tensor]]) -> str:
    """``absent`` (format 1), ``skipped`` (``tensors`` None) or ``verified``; a mismatch raises."""
    expected = meta.get("payload_sha256")
    if parse_version(meta.get("format_version"))[0] < 2 or expected is None:
        return "absent"
    if tensors is None:
        return "skipped"
    actual = payload_sha256(tensors)
    if actual != expected:
        raise VmqError(f"{path}: payload checksum mismatch (sha256 {actual[:16]}..., the file records "
                       f"{expected[:16]}...): the file is corrupt; --no-verify loads it anyway")
    return "verified"


def _build_model(path: Path, meta: dict, file_size: int) -> Tuple[nn.Module, str, dict]:
    """The floating-point model the metadata names, once its fp32 size is known to fit the file."""
    try:
        name = meta["model"]["name"]
        entry = entry_for(name)
        family = entry.family
        if meta["model"].get("family", family.name) != family.name:
            raise VmqError(f"{name} is a {family.name} model, the file says {meta['model']['family']}")
        stored = family.config_to_dict(family.config_from_dict(meta["model"]["config"]))
        base = family.config_to_dict(entry.config)
        overrides = {k: v for k, v in stored.items() if base.get(k) != v}
        layer_specs = dict(meta["layers"])
    except VmqError as exc:
        raise VmqError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise VmqError(f"{path}: broken vmq metadata ({type(exc).__name__}: {exc})".splitlines()[0][:300]) from None
    for key, value in overrides.items():
        if not _within(value, base.get(key), 1 << 20 if key == "num_classes" else None):
            raise VmqError(f"{path}: model config {key}={str(value)[:40]} is out of range for {name} "
                           f"(registered: {str(base.get(key))[:40]})")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a config being tried: its constructor's warnings are not the user's
        shell = _create(path, name, overrides)
    fp32 = 4 * sum(t.numel() for t in shell.state_dict().values())
    if fp32 > MAX_EXPANSION * file_size:
        raise VmqError(f"{path}: its metadata describes a model of {fp32:,} bytes in fp32, over {MAX_EXPANSION} "
                       f"times the file's {file_size:,} bytes: not a model this file can hold")
    del shell
    return _create(path, name, overrides), name, layer_specs


def _create(path: Path, name: str, overrides: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **overrides)
    except VmqError as exc:
        raise VmqError(f"{path}: {exc}") from None
    except Exception as exc:  # a config no model can have: any error of the constructor
        raise VmqError(f"{path}: the model config in its metadata does not build {name} "
                       f"({type(exc).__name__}: {exc})".splitlines()[0][:300]) from None


def _within(value, base, cap: Optional[int] = None) -> bool:
    """Whether a config override stays within a bound of its registered value (64x, for sizes and counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return True
    if isinstance(value, int):
        limit = cap or (MAX_EXPANSION * base if isinstance(base, int) and not isinstance(base, bool) and base > 0
                        else 1 << 16)
        return abs(value) <= limit
    items = list(base) if isinstance(base, (list, tuple)) and base else [None]
    if len(value) > MAX_EXPANSION * len(items):
        return False
    biggest = max((b for b in items if isinstance(b, int)), default=None)
    return all(_within(v, items[i] if i < len(items) else biggest) for i, v in enumerate(value))


def _load_layer(path: Union[str, Path], model_name: str, lname: str, spec: dict, target: Optional[nn.Module], tensors: dict):
    """The runtime layer ``lname`` rebuilt from ``spec`` and its tensors (popped from ``tensors``)."""
    if not isinstance(target, nn.Linear):
        raise VmqError(f"{path}: {model_name} has no linear layer {lname}")
    kind = spec.get("kind", "int") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in KINDS:
        raise VmqError(f"{path}: layer {lname} has unknown kind {str(kind)[:40]!r} (this vmq knows {', '.join(KINDS)})")
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
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError, ZeroDivisionError, AttributeError) as exc:
        raise VmqError(f"{path}: quantized layer {lname}: {exc}".splitlines()[0][:300]) from None
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


__all__ = ["FORMAT", "FORMAT_VERSION", "READS_MAJOR", "MAX_EXPANSION", "packed_state", "save_packed", "load_packed",
           "load_runtime_state",
           "read_metadata", "is_packed", "parse_version", "packed_meta", "check_payload"]

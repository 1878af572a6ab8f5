"""The packed file: one safetensors file that rebuilds a quantized model on its own.

Tensors (compressed-tensors naming), for each quantized layer ``<layer>``:

==========================  ======================================================================
``<layer>.weight``          int8 (N, K), 8-bit weights
``<layer>.weight_packed``   uint8, 2..7-bit weights bit-packed row-major (:mod:`vmq.pack.bits`)
``<layer>.weight_shape``    int64 (2,), the unpacked shape (N, K)
``<layer>.weight_scale``    fp32 (N,) per channel or (1,) per tensor
``<layer>.input_scale``     fp32 (T,) per token position or (1,) per tensor (static activations)
``<layer>.input_zero_point``  int32, shaped as ``input_scale``
``<layer>.smooth_scale``    fp32 (K,), only where smoothing was not folded into the previous op
``<layer>.bias``            fp32 (N,), when the layer has one
==========================  ======================================================================

Vector-quantized layers (``vmq vq``):

==========================  ======================================================================
``<layer>.weight_codes``    uint8, the (N, ceil(K_in / d)) codebook indices bit-packed row-major,
                            log2(size) bits each (:func:`vmq.pack.bits.pack_unsigned`)
``<layer>.weight_shape``    int64 (2,), the weight's shape (N, K_in)
``<layer>.weight_codebook`` fp16 (G, size, d), one codebook per group of output rows
``<layer>.weight_scale``    fp16 (N,), per-row scale, when the recipe asked for one
``<layer>.input_scale``, ``<layer>.input_zero_point``, ``<layer>.bias``: as above
==========================  ======================================================================

Every other tensor of the model is stored under its own name (norm weights already hold folded
smoothing scales). ``__metadata__["vmq"]`` is a JSON string: ``format``, ``format_version``,
``vmq_version``, ``model`` (registered name and full config), ``recipe`` (resolved),
``layers`` (per-layer scheme; ``kind`` is ``int`` or ``vq``) and ``results`` (what the command
measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from vmq.errors import VmqError
from vmq.pack.bits import pack_signed, pack_unsigned, packed_nbytes, unpack_signed, unpack_unsigned

FORMAT = "vmq.packed"
FORMAT_VERSION = 1


def read_metadata(path: Union[str, Path]) -> Optional[dict]:
    """The vmq metadata of a safetensors file, or None when it is not a vmq packed file."""
    from safetensors import safe_open

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
    """Write ``model`` (with :class:`QuantizedLinear` layers) atomically to ``path``."""
    from safetensors.torch import save_file

    import vmq
    from vmq.fileio import atomic_path
    from vmq.quant.qlinear import QuantizedLinear

    from vmq.models import model_names

    from vmq.vq.qlinear import VQLinear

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, VQLinear))}
    if not quantized:
        raise VmqError("the model has no quantized layer to pack")
    if getattr(model, "vmq_name", None) not in model_names():
        raise VmqError("the model has no registered name (model.vmq_name); a packed file must name its model")
    tensors: Dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{n}." for n in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value.detach().contiguous()
    layers = {}
    for name, q in quantized.items():
        if isinstance(q, VQLinear):
            tensors[f"{name}.weight_codes"] = pack_unsigned(q.weight_codes, q.code_bits)
            tensors[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features], dtype=torch.int64)
            attrs = ("weight_codebook", "weight_scale", "input_scale", "input_zero_point", "bias")
            layers[name] = {"kind": "vq", "dim": q.dim, "size": q.size, "rows_per_group": q.rows_per_group,
                            "row_scale": q.weight_scale is not None, "a_bits": q.a_bits, "a_strategy": q.a_strategy}
        else:
            if q.w_bits == 8:
                tensors[f"{name}.weight"] = q.weight.contiguous()
            else:
                tensors[f"{name}.weight_packed"] = pack_signed(q.weight, q.w_bits)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(q.weight.shape), dtype=torch.int64)
            attrs = ("weight_scale", "input_scale", "input_zero_point", "smooth_scale", "bias")
            layers[name] = {"kind": "int", "w_bits": q.w_bits, "w_strategy": q.w_strategy, "a_bits": q.a_bits,
                            "a_strategy": q.a_strategy}
        for attr in attrs:
            t = getattr(q, attr)
            if t is not None:
                tensors[f"{name}.{attr}"] = t.detach().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vmq_version": vmq.__version__,
        "model": {"name": getattr(model, "vmq_name", None), "config": model.cfg.to_dict()},
        "recipe": recipe,
        "layers": layers,
        "results": results or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})


def load_packed(path: Union[str, Path]) -> Tuple[nn.Module, dict]:
    """Rebuild the quantized model from a packed file alone; returns ``(model, metadata)``."""
    from safetensors import safe_open

    from vmq.models import VimConfig, config_for
    from vmq.quant.ptq import set_module

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

    import timm

    try:
        name = meta["model"]["name"]
        stored = VimConfig.from_dict(meta["model"]["config"])
        base = config_for(name).to_dict()
        overrides = {k: v for k, v in stored.to_dict().items() if base.get(k) != v}
        model = timm.create_model(name, pretrained=False, **overrides)
        layer_specs = dict(meta["layers"])
    except VmqError as exc:
        raise VmqError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VmqError(f"{path}: broken vmq metadata ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    model.vmq_name = name
    modules = dict(model.named_modules())
    for lname, spec in layer_specs.items():
        target = modules.get(lname)
        if not isinstance(target, nn.Linear):
            raise VmqError(f"{path}: {name} has no linear layer {lname}")
        try:
            shape = tuple(int(v) for v in tensors.pop(f"{lname}.weight_shape").tolist())
            if shape != (target.out_features, target.in_features):
                raise VmqError(f"{path}: {lname} is {shape} in the file but {name} has "
                               f"{(target.out_features, target.in_features)}")
            kind = spec.get("kind", "int")
            if kind == "vq":
                q = _load_vq_layer(path, lname, spec, shape, tensors)
            elif kind == "int":
                q = _load_int_layer(path, lname, spec, shape, tensors)
            else:
                raise VmqError(f"{path}: layer {lname} has unknown kind {kind!r}")
        except KeyError as exc:
            what = exc.args[0]
            raise VmqError(f"{path}: quantized layer {lname} lacks "
                           f"{'tensor' if str(what).startswith(lname) else 'metadata key'} {what}") from None
        except (ValueError, TypeError, RuntimeError) as exc:
            raise VmqError(f"{path}: quantized layer {lname}: {exc}".splitlines()[0]) from None
        set_module(model, lname, q)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise VmqError(f"{path}: tensors do not fit {name}: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.startswith(tuple(f"{n}." for n in layer_specs))]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise VmqError(f"{path}: tensors do not fit {name}: {what}")
    return model.eval(), meta


def _load_int_layer(path, lname: str, spec: dict, shape, tensors: dict):
    from vmq.quant.qlinear import QuantizedLinear

    if spec["w_bits"] == 8:
        w = tensors.pop(f"{lname}.weight")
    else:
        packed = tensors.pop(f"{lname}.weight_packed")
        numel = shape[0] * shape[1]
        if packed.numel() != packed_nbytes(numel, spec["w_bits"]):
            raise VmqError(f"{path}: {lname}.weight_packed has {packed.numel()} bytes, expected "
                           f"{packed_nbytes(numel, spec['w_bits'])}")
        w = unpack_signed(packed, spec["w_bits"], numel).reshape(shape)
    return QuantizedLinear(w, tensors.pop(f"{lname}.weight_scale"), spec["w_bits"], spec["w_strategy"],
                           spec["a_bits"], spec["a_strategy"], tensors.pop(f"{lname}.input_scale", None),
                           tensors.pop(f"{lname}.input_zero_point", None),
                           tensors.pop(f"{lname}.smooth_scale", None), tensors.pop(f"{lname}.bias", None))


def _load_vq_layer(path, lname: str, spec: dict, shape, tensors: dict):
    from vmq.vq.qlinear import VQLinear

    size, dim = int(spec["size"]), int(spec["dim"])
    if size < 2 or size & (size - 1) or dim < 1:
        raise VmqError(f"{path}: {lname} has an impossible codebook (size {size}, dim {dim})")
    bits = size.bit_length() - 1
    cols = -(-shape[1] // dim)
    numel = shape[0] * cols
    packed = tensors.pop(f"{lname}.weight_codes")
    if packed.numel() != packed_nbytes(numel, bits):
        raise VmqError(f"{path}: {lname}.weight_codes has {packed.numel()} bytes, expected "
                       f"{packed_nbytes(numel, bits)}")
    codes = unpack_unsigned(packed, bits, numel).reshape(shape[0], cols)
    codebook = tensors.pop(f"{lname}.weight_codebook")
    if codebook.dim() != 3 or tuple(codebook.shape[1:]) != (size, dim):
        raise VmqError(f"{path}: {lname}.weight_codebook is {tuple(codebook.shape)}, expected (G, {size}, {dim})")
    scale = tensors.pop(f"{lname}.weight_scale") if spec.get("row_scale") else None
    return VQLinear(codes, codebook, shape[1], spec["rows_per_group"], scale, tensors.pop(f"{lname}.bias", None),
                    spec["a_bits"], spec["a_strategy"], tensors.pop(f"{lname}.input_scale", None),
                    tensors.pop(f"{lname}.input_zero_point", None))


__all__ = ["FORMAT", "FORMAT_VERSION", "save_packed", "load_packed", "read_metadata", "is_packed"]

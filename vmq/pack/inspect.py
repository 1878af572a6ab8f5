"""What a packed file holds, read from its header and metadata alone (no model is built).

:func:`inspect_packed` gives the model (name, family), the method and recipe, each compressed
layer (kind, scheme, shape, bits per weight split into weights or codes, codebooks and scales, its
bytes), the file's size against the floating-point checkpoint of the same model (fp32), the figures
recorded at compression and the payload checksum's status: ``verified``, ``mismatch``, ``absent``
(format 1 files record none) or ``skipped``. Only each layer's ``weight_shape`` (16 bytes) is read
besides the header, and, to verify, the payload streamed through SHA-256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from vmq.errors import VmqError
from vmq.layers import KINDS
from vmq.pack.format import FORMAT_VERSION, packed_meta, parse_version
from vmq.safefile import SafeHeader, TensorEntry, read_header

_PICKLE_OR_ZIP = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save's zip, a pickle


def inspect_packed(path: Union[str, Path], verify: bool = True) -> Dict[str, Any]:
    """The facts of packed file ``path`` (see the module); JSON-ready."""
    path = Path(path)
    if not path.is_file():
        raise VmqError(f"packed file not found: {path}")
    try:
        header = read_header(path, "packed file ")
    except VmqError:
        _refuse_pickles(path)
        raise
    if "vmq" not in header.metadata:
        raise VmqError(f"{path} is a safetensors file of {len(header.entries)} tensors without vmq metadata "
                       "(a floating-point checkpoint?), not a vmq packed file")
    meta = packed_meta(header, path)
    try:
        layers = _layers(header, meta["layers"])
        model = meta["model"]
        info = {"name": str(model["name"]), "family": str(model.get("family")), "config": model.get("config")}
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise VmqError(f"{path}: broken vmq metadata ({type(exc).__name__}: {exc})".splitlines()[0][:300]) from None
    results = meta.get("results") if isinstance(meta.get("results"), dict) else {}
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    fp32 = _fp32_bytes(header, layers)
    major, minor = parse_version(meta["format_version"])
    return {
        "file": str(path),
        "file_bytes": header.file_size,
        "format_version": f"{major}.{minor}",
        "reader_format_version": FORMAT_VERSION,
        "vmq_version": meta.get("vmq_version"),
        "model": info,
        "method": results.get("method") or _recipe_method(recipe),
        "scheme": results.get("scheme"),
        "recipe": recipe,
        "layers": layers,
        "size": {"file_bytes": header.file_size, "fp32_bytes": fp32,
                 "ratio": round(fp32 / header.file_size, 3) if header.file_size else None,
                 "compressed_weights": sum(layer["weights"] for layer in layers.values()),
                 "bits_per_weight": _mean_bits(layers)},
        "results": results,
        "checksum": _checksum(header, meta, verify),
        "payload_sha256": meta.get("payload_sha256"),
    }


def _refuse_pickles(path: Path) -> None:
    """Name a .pth file as such (tried once the file failed as safetensors)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_OR_ZIP):
        raise VmqError(f"{path} is a PyTorch checkpoint (.pth), not a vmq packed file; `vmq inspect` reads the "
                       "packed .safetensors files that `vmq quantize` and `vmq vq` write")


def _checksum(header: SafeHeader, meta: dict, verify: bool) -> str:
    if parse_version(meta["format_version"])[0] < 2:
        return "absent"
    if not verify:
        return "skipped"
    return "verified" if header.payload_sha256() == meta["payload_sha256"] else "mismatch"


def _recipe_method(recipe: dict) -> Optional[str]:
    for stage in ("quantization", "vq"):
        if isinstance(recipe.get(stage), dict):
            return recipe[stage].get("method")
    return None


def _layers(header: SafeHeader, specs: dict) -> Dict[str, Dict[str, Any]]:
    if not isinstance(specs, dict):
        raise TypeError("layers is not a mapping")
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise TypeError(f"layer {name}'s spec is not a mapping")
        own = {k[len(name) + 1:]: e for k, e in header.entries.items() if k.startswith(f"{name}.")}
        shape_entry = own.get("weight_shape")
        if shape_entry is None or shape_entry.dtype != "I64" or shape_entry.shape != (2,):
            raise ValueError(f"layer {name} has no int64 (2,) weight_shape tensor")
        n_out, n_in = (int(v) for v in header.read_tensor(f"{name}.weight_shape", 64).tolist())
        kind = spec.get("kind", "int")
        row = {"kind": kind, "shape": [n_out, n_in], "weights": n_out * n_in,
               "bytes": sum(e.nbytes for e in own.values() if e is not shape_entry),
               "has_bias": "bias" in own}
        row.update(_bits(kind, spec, own, n_out, n_in))
        out[name] = row
    return out


def _bits(kind: str, spec: dict, own: Dict[str, TensorEntry], n_out: int, n_in: int) -> Dict[str, Any]:
    """The layer's scheme and bits per weight: weights (or codes), codebooks and scales apart."""
    weights = max(n_out * n_in, 1)

    def per_weight(*names: str) -> float:
        return round(sum(own[n].nbytes * 8 for n in names if n in own) / weights, 4)

    acts = f"A{spec.get('a_bits')}" if spec.get("a_bits") else "A16"
    if kind == "int":
        scheme = f"W{spec.get('w_bits')}{acts} per-{spec.get('w_strategy')}"
        parts = {"weights": per_weight("weight", "weight_packed"), "scales": per_weight("weight_scale")}
    elif kind == "vq" and isinstance(kind, str):
        size, dim = spec.get("size"), spec.get("dim")
        scheme = f"VQ d={dim} K={size}{' row-scale' if spec.get('row_scale') else ''} {acts}"
        codes = per_weight("weight_codes")
        if isinstance(size, int) and isinstance(dim, int) and size >= 2 and dim >= 1 and not size & (size - 1):
            codes = round(n_out * -(-n_in // dim) * (size.bit_length() - 1) / weights, 4)  # without byte padding
        parts = {"codes": codes, "codebook": per_weight("weight_codebook"), "scales": per_weight("weight_scale")}
    else:
        return {"scheme": f"unknown kind {str(kind)[:40]!r} (this vmq knows {', '.join(KINDS)})", "bits_per_weight": {}}
    parts["total"] = round(sum(parts.values()), 4)
    return {"scheme": scheme, "bits_per_weight": parts}


def _fp32_bytes(header: SafeHeader, layers: Dict[str, Dict[str, Any]]) -> int:
    """The fp32 checkpoint of the same model: every other tensor at 4 bytes a value, each layer's weight and bias."""
    prefixes = tuple(f"{n}." for n in layers)
    rest = sum(e.numel for k, e in header.entries.items() if not k.startswith(prefixes))
    return 4 * (rest + sum(r["weights"] + (r["shape"][0] if r["has_bias"] else 0) for r in layers.values()))


def _mean_bits(layers: Dict[str, Dict[str, Any]]) -> Optional[float]:
    known = [r for r in layers.values() if r["bits_per_weight"]]
    weights = sum(r["weights"] for r in known)
    if not weights:
        return None
    return round(sum(r["bits_per_weight"]["total"] * r["weights"] for r in known) / weights, 4)


__all__ = ["inspect_packed"]

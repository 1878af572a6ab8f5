"""Reading ``.pth`` checkpoints without trusting them.

``torch.load(..., weights_only=True)`` unpickles with torch's restricted unpickler: a file whose
pickle names anything but tensors, containers and plain values (code to run, arbitrary classes)
is refused, with a one-line recipe to convert a file the user trusts. Before that, the file's size
bounds what loading it may allocate: a torch zip archive whose records declare more bytes than the
file holds (compressed records: a zip bomb) or whose pickle is implausibly large is refused, and
after it, no tensor may claim more than its storage (a stride-0 view of one number standing for
gigabytes) nor the tensors together much more than the file.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict

import torch
from torch import Tensor

from vmq.errors import VmqError

#: the pickle of a state dict is about 100 bytes per tensor; a bigger one is not a checkpoint
MAX_PICKLE_BYTES = 16 << 20
#: tensors may add up to this many times the file's bytes (the same storage under two names)
MAX_VIEW_FACTOR = 2


def read_pth(path: Path) -> Any:
    """What a ``.pth`` file holds, loaded on the CPU by the restricted unpickler (see the module doc)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:
        _check_archive(path, size)
    try:
        # the official training script stores its argparse.Namespace beside the weights
        # torch warns on stderr about odd pickles ("Detected pickle protocol 106"); the error says enough
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        detail = found.group(1).strip() if found else str(exc)
        if re.search(r"global|class|reduce|function|build", detail, re.IGNORECASE):
            what = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise VmqError(f"cannot read {path}: it holds Python objects besides weights "
                           f"({what.group(1) if what else 'unsupported type'}); vmq never unpickles code. "
                           + convert_hint(path)) from None
        raise VmqError(f"cannot read {path}: truncated or corrupt ({short(detail)})") from None
    except MemoryError:
        raise VmqError(f"cannot read {path}: it declares more memory than there is (corrupt?)") from None
    except Exception as exc:  # truncated zip, random bytes, a storage that does not match its record...
        raise VmqError(f"cannot read {path}: truncated or corrupt ({short(exc)})") from None


def convert_hint(path: Path) -> str:
    """How to turn a trusted pickle checkpoint into a safetensors file, as one shell line."""
    out = str(path.with_suffix(".safetensors"))
    return ("If you trust the file, convert it once in your own Python: python -c \"import torch, safetensors.torch "
            f"as st; c = torch.load({str(path)!r}, weights_only=False); c = c.get('model', c); st.save_file("
            f"{{k: v.clone() for k, v in c.items() if torch.is_tensor(v)}}, {out!r})\" and pass {out}")


def _check_archive(path: Path, size: int) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise VmqError(f"cannot read {path}: truncated or corrupt (not a readable zip archive: {short(exc)})") \
            from None
    pickles = [r for r in records if r.filename.endswith("data.pkl")]
    if not pickles:
        raise VmqError(f"cannot read {path}: a zip archive but not a torch checkpoint (no data.pkl record)")
    declared = sum(r.file_size for r in records)
    if declared > size:
        raise VmqError(f"cannot read {path}: its records declare {declared:,} bytes in a file of {size:,} bytes "
                       "(compressed or corrupt; torch.save writes records uncompressed)")
    if max(r.file_size for r in pickles) > MAX_PICKLE_BYTES:
        raise VmqError(f"cannot read {path}: its pickle is over {MAX_PICKLE_BYTES >> 20} MiB, far more than a state "
                       "dict needs")


def check_tensors(sd: Dict[Any, Any], path: Path) -> None:
    """Refuse tensors that would cost far more memory than the file: views past their storage,
    or all together over :data:`MAX_VIEW_FACTOR` times the file; and kinds vmq cannot load."""
    size = path.stat().st_size
    total = 0
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            continue
        if not isinstance(k, str):
            raise VmqError(f"{path}: state dict key {short(repr(k))} is not a string")
        if v.layout != torch.strided or v.is_quantized or v.is_complex():
            raise VmqError(f"{path}: tensor {short(k)} is {v.layout} {v.dtype}; vmq reads dense real tensors")
        nbytes = v.numel() * v.element_size()
        if v.numel() and nbytes > v.untyped_storage().nbytes():
            raise VmqError(f"{path}: tensor {short(k)} of shape {tuple(v.shape)} claims {nbytes:,} bytes over a "
                           f"storage of {v.untyped_storage().nbytes():,} bytes (corrupt or hostile)")
        total += nbytes
        if total > MAX_VIEW_FACTOR * size:
            raise VmqError(f"{path}: its tensors claim over {total:,} bytes in a file of {size:,} bytes "
                           "(corrupt or hostile)")


def short(exc: Any) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    return msg[:160]


__all__ = ["read_pth", "check_tensors", "convert_hint", "MAX_PICKLE_BYTES", "MAX_VIEW_FACTOR"]

"""Safetensors files checked before anything is read from them, and a canonical hash of their payload.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (each tensor's
``dtype``, ``shape`` and ``data_offsets`` in the data section, and an optional ``__metadata__``
mapping strings to strings), then the data section. :func:`read_header` refuses, with one
:class:`~vmq.errors.VmqError` line naming the file, anything that is not exactly that: a header
length beyond the file or above :data:`MAX_HEADER_BYTES` (checked *before* the header is read, so a
header claiming gigabytes allocates nothing), JSON that is not an object of the right shape,
unknown dtypes, shapes that are not lists of non-negative integers, offsets that do not match
dtype x shape, tensors that overlap, leave gaps or run past the end of the file (a truncated
file), trailing bytes. Once a header passes, every byte of the data section belongs to exactly one
tensor and reading the tensors allocates no more than the file's size.

:func:`payload_sha256` (tensors in memory) and :meth:`SafeHeader.payload_sha256` (streamed from
the file, 1 MiB at a time) compute the same digest: SHA-256 over the tensors in name order, each
as a line ``[name, dtype, shape, nbytes]`` (JSON) followed by its raw little-endian bytes. It
covers every payload byte and each tensor's name, dtype and shape, and can be computed before a
file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Mapping, Tuple, Union

import torch
from torch import Tensor

from vmq.errors import VmqError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_CHUNK = 1 << 20

#: safetensors dtype name -> (bytes per element, torch dtype)
DTYPES: Dict[str, Tuple[int, torch.dtype]] = {
    "BOOL": (1, torch.bool), "U8": (1, torch.uint8), "I8": (1, torch.int8),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "I16": (2, torch.int16), "U16": (2, torch.uint16), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32), "U32": (4, torch.uint32), "F32": (4, torch.float32),
    "I64": (8, torch.int64), "U64": (8, torch.uint64), "F64": (8, torch.float64),
}
_NAME_OF = {dt: name for name, (_, dt) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checked header; ``begin`` and ``end`` are offsets in the data section."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafeHeader:
    """A safetensors header that passed every check of :func:`read_header`."""

    path: Path
    file_size: int
    header_bytes: int
    entries: Dict[str, TensorEntry]
    metadata: Dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes

    def chunks(self, entry: TensorEntry, chunk: int = _CHUNK) -> Iterator[bytes]:
        """The raw bytes of ``entry``, read from the file ``chunk`` bytes at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry.begin)
            left = entry.nbytes
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise VmqError(f"{self.path}: the file ended while reading tensor {entry.name} (changed on disk?)")
                left -= len(data)
                yield data

    def read_tensor(self, name: str, max_bytes: int = _CHUNK) -> Tensor:
        """A small tensor read straight from the file (at most ``max_bytes``), without loading the others."""
        entry = self.entries[name]
        if entry.nbytes > max_bytes:
            raise VmqError(f"{self.path}: tensor {name} is {entry.nbytes:,} bytes, more than expected")
        data = bytearray(b"".join(self.chunks(entry)))
        dtype = DTYPES[entry.dtype][1]
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat.reshape(entry.shape).clone()

    def payload_sha256(self) -> str:
        """The canonical payload digest (see the module), streamed from the file."""
        h = hashlib.sha256()
        for name in sorted(self.entries):
            e = self.entries[name]
            _update_entry(h, name, e.dtype, e.shape, e.nbytes)
            for data in self.chunks(e):
                h.update(data)
        return h.hexdigest()


def read_header(path: Union[str, Path], what: str = "") -> SafeHeader:
    """Check the safetensors file ``path`` (see the module) and return its header.

    ``what`` prefixes the file in messages (``"calibration stats "``, ``"packed file "``)."""
    path = Path(path)
    prefix = f"cannot read {what}{path}: not a valid safetensors file"

    def bad(reason: str) -> VmqError:
        return VmqError(f"{prefix} ({reason})")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise bad(f"its header claims {n:,} bytes but the file has {size - 8:,} after the length: "
                          "truncated or not safetensors")
            if n > MAX_HEADER_BYTES:
                raise bad(f"a header of {n:,} bytes is over the {MAX_HEADER_BYTES >> 20} MiB limit")
            raw = f.read(n)
    except OSError as exc:
        raise VmqError(f"cannot read {what}{path}: {exc.strerror or type(exc).__name__}") from None
    if len(raw) != n:
        raise bad("the file changed while being read")
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise bad("its header is not UTF-8") from None
    except RecursionError:
        raise bad("its header is not JSON: nested too deeply") from None
    except ValueError as exc:
        raise bad(f"its header is not JSON: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries = {name: _entry(name, info, bad) for name, info in header.items()}
    _check_layout(entries, data_len, bad)
    return SafeHeader(path, size, n, entries, metadata)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup[:60]!r} appears twice")
    return dict(pairs)


def _entry(name: str, info, bad) -> TensorEntry:
    label = f"tensor {name[:80]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"{label} must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"{label} has unknown dtype {str(dtype)[:20]!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"{label} has shape {str(shape)[:40]}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"{label} has data_offsets {str(offsets)[:40]}, not [begin, end] with 0 <= begin <= end")
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    need = entry.numel * DTYPES[dtype][0]
    if need != entry.nbytes:
        raise bad(f"{label}: {dtype} {list(shape)[:8]} needs {need:,} bytes but its offsets span {entry.nbytes:,}")
    return entry


def _check_layout(entries: Dict[str, TensorEntry], data_len: int, bad) -> None:
    """Every byte of the data section in exactly one tensor: no overlap, no gap, nothing past the end."""
    pos, prev = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise bad(f"tensors {prev!r} and {e.name[:80]!r} overlap")
        if e.begin > pos:
            raise bad(f"{e.begin - pos:,} bytes before tensor {e.name[:80]!r} belong to no tensor")
        if e.end > data_len:
            raise bad(f"tensor {e.name[:80]!r} ends at byte {e.end:,}, past the {data_len:,}-byte data section: "
                      "truncated")
        pos, prev = e.end, e.name[:80]
    if pos != data_len:
        raise bad(f"{data_len - pos:,} bytes after the last tensor belong to no tensor")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _update_entry(h, name: str, dtype: str, shape: Iterable[int], nbytes: int) -> None:
    h.update(json.dumps([name, dtype, list(shape), nbytes]).encode() + b"\n")


def payload_sha256(tensors: Mapping[str, Tensor]) -> str:
    """The canonical payload digest (see the module) of tensors in memory, as they would be saved."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype not in _NAME_OF:
            raise VmqError(f"tensor {name} has dtype {t.dtype}, which safetensors files cannot hold")
        t = t.cpu().contiguous()
        _update_entry(h, name, _NAME_OF[t.dtype], t.shape, t.numel() * t.element_size())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


__all__ = ["DTYPES", "MAX_HEADER_BYTES", "SafeHeader", "TensorEntry", "payload_sha256", "read_header"]

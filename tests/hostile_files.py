"""Builders of broken and hostile input files (checkpoints, recipes), shared by the hostile-input tests.

Each ``PTH`` entry writes one bad ``.pth`` file and names a phrase the one-line error must hold.
Nothing here runs the code a hostile pickle carries: the checks prove that vmq does not either
(the "evil" pickles would create ``<folder>/PWNED``).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch


class Evil:
    """Unpickling this runs ``os.system`` (to create a marker file) - under a trusting loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state_dict() -> Dict[str, torch.Tensor]:
    return {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.zeros(8)}


def evil_zip(p: Path) -> None:
    torch.save({"model": _state_dict(), "payload": Evil(p.parent / "PWNED")}, p)


def evil_plain_pickle(p: Path) -> None:
    p.write_bytes(pickle.dumps({"w": Evil(p.parent / "PWNED")}, protocol=2))


def evil_legacy(p: Path) -> None:
    torch.save({"w": torch.zeros(2), "x": Evil(p.parent / "PWNED")}, p, _use_new_zipfile_serialization=False)


def truncated_zip(p: Path) -> None:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf)
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def truncated_legacy(p: Path) -> None:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, _use_new_zipfile_serialization=False)
    p.write_bytes(buf.getvalue()[:-40])


def random_bytes(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 16)


def empty(p: Path) -> None:
    p.write_bytes(b"")


def zip_not_torch(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")


def _save(obj) -> Callable[[Path], None]:
    return lambda p: torch.save(obj, p)


def expanded_view(p: Path) -> None:
    """One stored float standing for 2**31 of them (stride 0)."""
    torch.save({"w": torch.zeros(1, dtype=torch.float16).expand(1 << 31)}, p)


def many_names(p: Path) -> None:
    """20,000 names for one 64 KiB storage: 1.3 GB of tensors from a file of about a megabyte."""
    t = torch.zeros(1 << 14)
    torch.save({f"w{i}": t for i in range(20000)}, p)


class _Storage:
    pass


class _Rebuild:
    def __init__(self, storage, size):
        self.storage, self.size = storage, size

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.size,), (1,), False,
                                                 collections.OrderedDict())


def storage_archive(p: Path, numel: int, record: bytes, compress: bool = False) -> None:
    """A torch zip archive whose one float storage declares ``numel`` elements and holds ``record``
    (deflate-compressed when ``compress``: a zip bomb)."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": _Rebuild(storage, numel)})
    with zipfile.ZipFile(p, "w") as z:
        for name, data in (("data.pkl", buf.getvalue()), ("byteorder", b"little"), ("data/0", record),
                           ("version", b"3\n")):
            z.writestr(f"archive/{name}", data,
                       compress_type=zipfile.ZIP_DEFLATED if compress and name == "data/0" else zipfile.ZIP_STORED)


def zip_bomb(p: Path) -> None:
    """A 300 KB file whose storage inflates to 256 MB."""
    storage_archive(p, 1 << 26, bytes(1 << 28), compress=True)


def storage_past_record(p: Path) -> None:
    """A storage declaring 2**40 floats over a 16-byte record."""
    storage_archive(p, 1 << 40, bytes(16))


def legacy_claim(p: Path) -> None:
    """Legacy (non-zip) format whose storage declares 500 M floats and holds 16 bytes."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    b = buf.getvalue()
    n = 500_000_000
    # the main pickle's storage numel and tensor size (BININT1 4), then the storage record's numel header
    first = b.index(b"cpu") + len(b"cpuq\x06") if b"cpuq\x06" in b else None
    assert first is not None and b[first:first + 2] == b"K\x04", "torch changed its legacy format"
    out = b[:first] + b"J" + struct.pack("<i", n) + b[first + 2:]
    tail = out.rindex(struct.pack("<q", 4))
    p.write_bytes(out[:tail] + struct.pack("<q", n) + out[tail + 8:])


#: name -> (builder, phrase the one-line error holds)
PTH: Dict[str, Tuple[Callable[[Path], None], str]] = {
    "evil_zip": (evil_zip, "never unpickles code"),
    "evil_plain_pickle": (evil_plain_pickle, "never unpickles code"),
    "evil_legacy": (evil_legacy, "never unpickles code"),
    "truncated_zip": (truncated_zip, "truncated or corrupt"),
    "truncated_legacy": (truncated_legacy, "truncated or corrupt"),
    "random_bytes": (random_bytes, "truncated or corrupt"),
    "odd_pickle_protocol": (lambda p: p.write_bytes(b"\x80\x6a" + bytes(range(40))), "truncated or corrupt"),
    "empty": (empty, "is empty"),
    "zip_not_torch": (zip_not_torch, "not a torch checkpoint"),
    "junk_ints": (_save({"a": 1, "b": "text"}), "not a state dict"),
    "junk_list": (_save([1, 2, 3]), "not a state dict"),
    "junk_string": (_save("weights"), "not a state dict"),
    "junk_tensor": (_save(torch.zeros(3)), "not a state dict"),
    "junk_model_block": (_save({"model": {"a": 1}}), "holds no tensors"),
    "int_keys": (_save({1: torch.zeros(2)}), "is not a string"),
    "complex_tensor": (_save({"w": torch.zeros(2, dtype=torch.complex64)}), "dense real tensors"),
    "expanded_view": (expanded_view, "over a storage of"),
    "many_names": (many_names, "tensors claim over"),
    "zip_bomb": (zip_bomb, "records declare"),
    "storage_past_record": (storage_past_record, "truncated or corrupt"),
    "legacy_claim": (legacy_claim, "truncated or corrupt"),
}

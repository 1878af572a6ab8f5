"""Writing outputs safely: a file appears complete under its name, or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from vmq.errors import VmqError


def check_output_path(dest: Union[str, Path]) -> Path:
    """Fail early (before any long work) when ``dest`` cannot be written."""
    dest = Path(dest)
    if dest.is_dir():
        raise VmqError(f"output {dest} is a directory")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise VmqError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VmqError(f"output folder {parent} is not writable")
    return dest


@contextmanager
def atomic_path(dest: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds."""
    dest = check_output_path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: Union[str, Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

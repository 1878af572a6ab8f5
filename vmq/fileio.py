"""Writing outputs safely: a file appears complete under its name, or not at all.

A write that fails (a full disk or quota, the file-size limit, an I/O error) becomes one
:class:`~vmq.errors.VmqError` naming the output, e.g. ``no space left on device writing out.safetensors``,
and the temporary file is removed: no partial output is left behind.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from vmq.errors import VmqError

#: errno values that mean the output does not fit
NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file-size limit, see `ulimit -f`, or the file system's)",
}
#: how writers outside Python (safetensors) report an operating-system error: "... (os error 28)"
_FOREIGN_OS_ERROR = re.compile(r"os error (\d+)")


def write_error(exc: BaseException, dest: Union[str, Path]) -> Optional[VmqError]:
    """The one-line error for ``exc`` raised while writing ``dest``; None when it is no write error."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, OSError):
        found = _FOREIGN_OS_ERROR.search(str(exc))
        code = int(found.group(1)) if found else None
    if code is None:
        return VmqError(f"cannot write {dest}: {exc}") if isinstance(exc, OSError) else None
    if code in NO_ROOM:
        return VmqError(f"{NO_ROOM[code]} writing {dest}")
    return VmqError(f"cannot write {dest}: {os.strerror(code)}")


def check_output_path(dest: Union[str, Path]) -> Path:
    """Fail early (before any long work) when ``dest`` cannot be written."""
    if "\0" in str(dest):
        raise VmqError(f"output path {str(dest)!r} contains a NUL character")
    dest = Path(dest)
    if dest.is_dir():
        raise VmqError(f"output {dest} is a directory")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise VmqError(f"output folder {parent} " + ("is not a folder" if parent.exists() else "does not exist"))
    if not os.access(parent, os.W_OK):
        raise VmqError(f"output folder {parent} is not writable")
    return dest


@contextmanager
def atomic_path(dest: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    An OSError (or a writer's "os error N") inside the block becomes a VmqError naming ``dest``;
    whatever happens, the temporary file does not outlive the block."""
    dest = check_output_path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(exc, dest) from None
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp_path, dest)
        except VmqError:
            raise
        except Exception as exc:
            error = write_error(exc, dest)
            if error is None:
                raise
            raise error from None
    finally:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder went away: nothing of the output is left either


def sha256_file(path: Union[str, Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

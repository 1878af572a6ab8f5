"""Per-block progress of the long commands (``vmq calibrate``, ``quantize``, ``vq``), for ``--resume``.

A run that keeps progress writes a folder beside its output, ``<out>.progress/``
(:func:`progress_path_for`):

* ``run.json``: what the work depends on, its *identity*: the command, the vmq version, the
  settings (for compression the resolved recipe, less ``eval`` and the paths whose contents are
  hashed instead), the sha256 of the model's weights, of the calibration images and of given
  calibration statistics, and the number of blocks;
* ``block-NNNN.safetensors``: one per finished block, written in order: the block's tensors and a
  JSON string under ``__metadata__["vmq"]`` (no pickle anywhere).

Under torch.distributed (``torchrun``) rank 0 alone reads and writes the folder and sends what
it reads to the other ranks, so only rank 0's machine needs it. Nothing in the identity depends on
the number of processes (the images' sha256 is made batch by batch, :func:`images_sha256`, and the
engine's results are the same bytes in any number of processes), so a run can be resumed with
another number of processes than the one that was interrupted.

The folder appears with the first finished block, complete with its ``run.json`` (made under a
temporary name, then renamed), so a run that fails before finishing a block leaves nothing; each
block file is written atomically (:func:`vmq.fileio.atomic_path`), so a run killed at any
moment leaves either a block whole or not at all. A resumed run continues after the last whole
block; a progress folder made with another identity is refused by name, and so is an existing
folder when the run was not asked to resume (it would otherwise be silently discarded). The
caller removes the folder (:meth:`ProgressStore.remove`) once its output is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from vmq import __version__
from vmq.distributed import SINGLE, Dist
from vmq.errors import VmqError
from vmq.fileio import atomic_path, check_output_path

RUN_FILE = "run.json"
FORMAT = "vmq.progress"
BLOCK_FILE = re.compile(r"block-(\d{4,})\.safetensors")
_TEMP_FILE = re.compile(r"\.(block-\d{4,}\.safetensors|run\.json)\..+\.tmp")


def progress_path_for(out: Union[str, Path]) -> Path:
    """Where the progress of the run writing ``out`` lives: ``<out>.progress`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".progress")


def tensor_sha256(tensors: Iterable[Tuple[str, Tensor]]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``(name, tensor)`` pairs, in order."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def images_sha256(images: Tensor, unit: int, dist: Dist = SINGLE) -> str:
    """sha256 of a calibration set held in shards of whole ``unit``-image batches (``images`` is
    this process's shard): the sha256 of each batch's :func:`tensor_sha256`, in batch order over
    all processes. The same for any number of processes (every process gets it)."""
    digests = [bytes.fromhex(tensor_sha256([("images", chunk)])) for chunk in images.split(unit)]
    local = torch.tensor(list(b"".join(digests)), dtype=torch.uint8, device="cpu").view(-1, 32) if digests else None
    every = dist.gather_cat(local)
    return hashlib.sha256(every.numpy().tobytes() if every is not None else b"").hexdigest()


def refuse_unasked(folder: Union[str, Path], resume: bool) -> None:
    """Fail (before any long work) when ``folder`` holds progress and the run was not asked to resume."""
    folder = Path(folder)
    if folder.exists() and not resume:
        done = ProgressStore.count_done(folder) if folder.is_dir() else 0
        raise VmqError(f"{folder} holds the progress of an interrupted run (blocks done: {done}); rerun with "
                       "--resume to continue it, or remove it to start over")


class ProgressStore:
    """The progress folder of one run; :meth:`open` it, then :meth:`save_block` after each block."""

    def __init__(self, folder: Path, identity: Dict[str, Any], done: int, dist: Dist = SINGLE):
        self.folder, self.identity, self.done, self.dist = folder, identity, done, dist

    @classmethod
    def open(cls, folder: Union[str, Path], identity: Dict[str, Any], resume: bool,
             dist: Dist = SINGLE) -> "ProgressStore":
        """The store at ``folder`` for a run of ``identity`` (JSON-ready; ``blocks`` its block count;
        the same on every rank).

        A missing folder is made when the first block is recorded. An existing one is continued
        when ``resume`` and its identity is this run's, else refused with one line that says what
        differs (on every rank)."""
        folder = Path(folder)
        identity = {"format": FORMAT, "vmq_version": __version__, **identity}
        done = dist.check_on_main(lambda: cls._done_in(folder, identity, resume))
        return cls(folder, identity, dist.broadcast_int(done if done is not None else 0), dist)

    @classmethod
    def _done_in(cls, folder: Path, identity: Dict[str, Any], resume: bool) -> int:
        """The blocks ``folder`` holds for a run of ``identity`` (0 when it does not exist)."""
        refuse_unasked(folder, resume)
        if not folder.exists():
            check_output_path(folder)  # fail before the work, not after the first block
            return 0
        saved = cls._read_identity(folder)
        difference = _difference(saved, identity)
        if difference is not None:
            raise VmqError(f"the progress in {folder} was made {difference}; remove it to start over")
        return min(cls.count_done(folder), int(identity.get("blocks", 0)))

    @staticmethod
    def _create(folder: Path, identity: Dict[str, Any]) -> None:
        check_output_path(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions
            (tmp / RUN_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")
            os.rename(tmp, folder)
        except OSError as exc:
            raise VmqError(f"cannot create the progress folder {folder}: {exc.strerror or exc}") from None
        finally:
            if tmp.exists():
                for p in tmp.iterdir():
                    p.unlink()
                tmp.rmdir()

    @staticmethod
    def _read_identity(folder: Path) -> Dict[str, Any]:
        try:
            saved = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise VmqError(f"{folder} is not a vmq progress folder (no readable {RUN_FILE}); remove or rename it")
        return saved

    @staticmethod
    def count_done(folder: Path) -> int:
        """The finished blocks recorded in ``folder``: block files 0, 1, ... without a gap."""
        found = {int(m.group(1)) for p in folder.iterdir() if (m := BLOCK_FILE.fullmatch(p.name))}
        done = 0
        while done in found:
            done += 1
        return done

    def _block_path(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}.safetensors"

    def save_block(self, index: int, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> None:
        """Record block ``index`` (the next one) as finished: its tensors and JSON-ready ``meta``."""
        if index != self.done:
            raise ValueError(f"block {index} recorded after {self.done} finished blocks")
        self.dist.check_on_main(lambda: self._write_block(index, tensors, meta))
        self.done = index + 1

    def _write_block(self, index: int, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> None:
        cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        if not self.folder.exists():
            self._create(self.folder, self.identity)
        with atomic_path(self._block_path(index)) as tmp:
            save_file(cpu, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})

    def load_block(self, index: int) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """The tensors (on the CPU) and metadata recorded for block ``index`` (read by rank 0 and
        sent to the others under torch.distributed)."""
        path = self._block_path(index)
        data = self.dist.broadcast_bytes(self.dist.check_on_main(lambda: self._read(path)))
        try:
            (size,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + size])
            meta = json.loads(header["__metadata__"]["vmq"])
            tensors = load_safetensors(data)
        except Exception as exc:
            why = (str(exc).splitlines() or [""])[0]
            raise VmqError(f"cannot read {path} ({type(exc).__name__}: {why}); remove {self.folder} to start "
                           "over") from None
        if not isinstance(meta, dict):
            raise VmqError(f"{path}: broken progress metadata; remove {self.folder} to start over")
        return tensors, meta

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise VmqError(f"cannot read {path} ({exc.strerror or exc}); remove {self.folder} to start over") from None

    def remove(self) -> None:
        """Delete the folder: its run file, block files and leftover temporary files (nothing else).
        Rank 0's work under torch.distributed (the others do nothing)."""
        if not self.dist.is_main or not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if p.name == RUN_FILE or BLOCK_FILE.fullmatch(p.name) or _TEMP_FILE.fullmatch(p.name):
                p.unlink()
        try:
            self.folder.rmdir()
        except OSError:
            pass  # something else was put there: leave it


def _difference(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """What differs between a saved identity and this run's, in words (None when nothing does)."""
    if saved.get("command") != now.get("command"):
        return f"by `vmq {saved.get('command')}`, not `vmq {now.get('command')}`"
    if saved.get("vmq_version") != now.get("vmq_version"):
        return f"by vmq {saved.get('vmq_version')} (this is vmq {now.get('vmq_version')})"
    what = "a different recipe" if now.get("command") in ("quantize", "vq") else "different settings"
    key = _first_difference(_flat(saved.get("settings") or {}), _flat(now.get("settings") or {}))
    if key is not None:
        there, here = (_show(_flat(d.get("settings") or {}).get(key, "(absent)")) for d in (saved, now))
        return f"with {what} ({key}: {there} there, {here} now)"
    for key, label in (("model_sha256", "a different model (weights sha256"),
                       ("images_sha256", "a different calibration set (images sha256"),
                       ("stats_sha256", "other calibration statistics (--stats; sha256"),
                       ("blocks", "a model of another depth (blocks:")):
        if saved.get(key) != now.get(key):
            return f"with {label} {_short(saved.get(key))} there, {_short(now.get(key))} now)"
    return None


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _first_difference(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    for key in list(now) + [k for k in saved if k not in now]:
        if saved.get(key, _ABSENT) != now.get(key, _ABSENT):
            return key
    return None


_ABSENT = object()


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _short(v: Any) -> str:
    return f"{v[:12]}..." if isinstance(v, str) and len(v) > 16 else ("none" if v is None else str(v))


__all__ = ["ProgressStore", "progress_path_for", "tensor_sha256", "images_sha256", "refuse_unasked"]

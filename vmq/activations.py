"""Where compression keeps block activations: on the device, in host memory, or in files.

The compression engine (:mod:`vmq.compress.engine`) and the statistics pass
(:func:`vmq.calib.collect_stats`) run the model block by block over every calibration image, so
they hold one block's inputs and outputs (:data:`~vmq.models.family.BlockIO`) for all the images
at a time: the floating-point and the compressed inputs, the floating-point outputs (the target)
and the next inputs. An :class:`ActivationStore` places each of these tensors when it is made,
batch by batch (never the whole set at once):

- on the compression device while the store's device-held total stays within the budget
  (:class:`MemoryBudget`, ``--max-memory``; no budget: always there);
- past the budget, in a file under ``--offload-dir`` (on the CPU or CUDA), or else, on CUDA, in
  pinned host memory.

A tensor kept off the device is an :class:`OffloadedTensor`: indexing it (with a slice or an index
tensor, which is all the block I/O helpers and :class:`~vmq.optimise.BlockTrainer` do) returns
those samples on the device. Offload files are read and written with positioned reads and writes,
not mapped (mapped pages would count in the process's resident memory as they are touched); they
are anonymous (removed when closed, also when the process dies) inside a per-run folder that
:meth:`ActivationStore.close` removes. The values are the same wherever they are kept, so the
compressed model does not depend on the budget.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.models.family import BlockIO, ModelFamily, io_batches, io_len

_UNITS = {"": 1, "b": 1,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(value: Union[str, int], what: str = "--max-memory") -> int:
    """Bytes from ``8GB``, ``512MiB``, ``1.5G`` or a plain number of bytes.

    KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB (and K, M, G, T) powers of 1024."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise VmqError(f"{what}: expected a size such as 8GB or 512MiB, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise VmqError(f"{what}: a size cannot be negative ({value})")
        return value
    m = _SIZE.fullmatch(value)
    if m is None:
        raise VmqError(f"{what}: {value[:40]!r} is not a size (examples: 8GB, 512MiB, 1.5GiB, 1000000)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise VmqError(f"{what}: unknown unit {m.group(2)[:20]!r} in {value[:40]!r} (B, KB, MB, GB, TB are powers "
                       "of 1000; KiB, MiB, GiB, TiB and K, M, G, T powers of 1024)")
    size = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(size):
        raise VmqError(f"{what}: {value[:40]!r} is too large")
    return int(size)


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes of block activations the compression device may hold, and where the rest goes.

    ``max_bytes``: None for no limit. ``offload_dir``: where activations past the budget go as
    files; without it they go to host memory, which needs a CUDA compression device (on the CPU
    the host memory is the device's)."""

    max_bytes: Optional[int] = None
    offload_dir: Optional[Path] = None

    @classmethod
    def of(cls, max_memory: Union[str, int, None] = None,
           offload_dir: Union[str, Path, None] = None) -> "MemoryBudget":
        """From the ``--max-memory`` and ``--offload-dir`` values (checked: one clear error)."""
        return cls(None if max_memory is None else parse_size(max_memory),
                   None if offload_dir is None else Path(offload_dir))

    def check(self, device: Union[str, torch.device]) -> None:
        """Fail before any work when this budget cannot be kept on ``device``."""
        if self.offload_dir is not None:
            d = self.offload_dir
            if d.exists() and not d.is_dir():
                raise VmqError(f"--offload-dir {d} is not a folder")
            parent = d if d.exists() else next((p for p in d.absolute().parents if p.exists()), None)
            if parent is None or not os.access(parent, os.W_OK | os.X_OK):
                raise VmqError(f"--offload-dir {d} is not writable")
        elif self.max_bytes is not None and torch.device(device).type != "cuda":
            raise VmqError(f"--max-memory on {torch.device(device).type} needs --offload-dir DIR: the activations "
                           "past the budget are written there (host memory is the device's memory here)")


class OffloadedTensor:
    """A batch-first tensor kept off the compression device; ``t[index]`` gives those samples on it.

    ``shape``, ``dtype`` and ``device`` (where its samples are delivered) are those of the tensor it
    stands for; ``finite`` says whether every value written was finite."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device
        self.finite = True

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def write(self, offset: int, part: Tensor) -> None:
        if part.is_floating_point():
            self.finite = self.finite and bool(torch.isfinite(part).all())
        self._write(offset, part.detach())

    def __getitem__(self, index: Union[slice, Tensor]) -> Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            rows = torch.arange(start, stop, step, device="cpu")
        elif isinstance(index, Tensor) and index.dim() == 1 and not index.is_floating_point():
            rows = index.to("cpu")
        else:
            raise TypeError(f"an offloaded tensor is indexed by a slice or a 1-D index tensor, not {index!r}")
        return self._read(rows).to(self.device, non_blocking=True)

    def _write(self, offset: int, part: Tensor) -> None:
        raise NotImplementedError

    def _read(self, rows: Tensor) -> Tensor:
        raise NotImplementedError


class HostTensor(OffloadedTensor):
    """Kept in host memory (pinned, for fast copies to a CUDA device)."""

    where = "host"

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__(shape, dtype, device)
        self.data = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")

    def _write(self, offset: int, part: Tensor) -> None:
        self.data[offset:offset + part.shape[0]].copy_(part)

    def _read(self, rows: Tensor) -> Tensor:
        if len(rows) and bool((rows[1:] - rows[:-1] == 1).all()):  # a run of samples: a view, no gather
            return self.data[int(rows[0]):int(rows[0]) + len(rows)]
        return self.data[rows]


class DiskTensor(OffloadedTensor):
    """Kept in an anonymous file in ``directory``, one sample after another (read with ``pread``)."""

    where = "disk"

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, directory: Path):
        super().__init__(shape, dtype, device)
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        try:
            self.file = tempfile.TemporaryFile(dir=directory)
            if self.nbytes:
                os.posix_fallocate(self.file.fileno(), 0, self.nbytes)  # a full disk fails now, not midway
        except OSError as exc:
            raise VmqError(f"--offload-dir: cannot make a {self.nbytes:,}-byte file in {directory}: "
                           f"{exc.strerror or exc}") from None

    def _write(self, offset: int, part: Tensor) -> None:
        view = memoryview(_bytes_of(part.to("cpu").contiguous()))
        pos = offset * self.row_bytes
        try:
            while view:
                done = os.pwrite(self.file.fileno(), view, pos)
                view, pos = view[done:], pos + done
        except OSError as exc:
            raise VmqError(f"--offload-dir: cannot write activations: {exc.strerror or exc}") from None

    def _read(self, rows: Tensor) -> Tensor:
        out = torch.empty((len(rows),) + tuple(self.shape[1:]), dtype=self.dtype, device="cpu")
        buf = memoryview(_bytes_of(out))
        k, rows = 0, rows.tolist()
        while k < len(rows):  # one read per run of consecutive samples
            j = k + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            self._read_into(buf[k * self.row_bytes:j * self.row_bytes], rows[k] * self.row_bytes)
            k = j
        return out

    def _read_into(self, view: memoryview, pos: int) -> None:
        while view:
            got = os.preadv(self.file.fileno(), [view], pos)
            if got <= 0:
                raise VmqError("--offload-dir: an activation file ended early (was it truncated?)")
            view, pos = view[got:], pos + got

    def close(self) -> None:
        self.file.close()


def _bytes_of(t: Tensor):
    """A writable byte view (numpy) of contiguous CPU tensor ``t``'s memory."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else bytearray()


StoredTensor = Union[Tensor, OffloadedTensor]


class ActivationStore:
    """Places block activations on ``device`` within ``budget``, the rest off it (see the module doc).

    Use it as a context manager (or call :meth:`close`): the offload folder is removed at the end,
    also after an error. ``placed`` counts the bytes placed on the ``device``, in ``host`` memory and
    on ``disk`` so far; ``device_peak`` the most bytes it held on the device at once."""

    def __init__(self, device: Union[str, torch.device], budget: MemoryBudget = MemoryBudget()):
        budget.check(device)
        self.device, self.budget = torch.device(device), budget
        self.on_device = 0
        self.device_peak = 0
        self.placed: Dict[str, int] = {"device": 0, "host": 0, "disk": 0}
        self._dir: Optional[Path] = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def report(self) -> Dict[str, Optional[int]]:
        """What the results say about the activations' memory."""
        return {"budget_bytes": self.budget.max_bytes, "device_peak_bytes": self.device_peak,
                "host_bytes": self.placed["host"], "offloaded_bytes": self.placed["disk"]}

    # -- placing ---------------------------------------------------------------------------
    def allocate(self, shape: Tuple[int, ...], dtype: torch.dtype) -> StoredTensor:
        """An empty tensor of ``shape``, on the device when it fits the budget, else off it."""
        nbytes = math.prod(shape) * dtype.itemsize
        limit = self.budget.max_bytes
        if limit is None or self.on_device + nbytes <= limit:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self.on_device += nbytes
            self.device_peak = max(self.device_peak, self.on_device)
            self.placed["device"] += nbytes
            weakref.finalize(t, self._freed, nbytes)
            return t
        if self.budget.offload_dir is not None:
            t = DiskTensor(shape, dtype, self.device, self._folder())
        else:
            t = HostTensor(shape, dtype, self.device)
        self.placed[t.where] += nbytes
        return t

    def _freed(self, nbytes: int) -> None:
        self.on_device -= nbytes

    def _folder(self) -> Path:
        if self._dir is None:
            root = self.budget.offload_dir
            try:
                root.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="vmq-activations-", dir=root))
            except OSError as exc:
                raise VmqError(f"--offload-dir {root}: {exc.strerror or exc}") from None
        return self._dir

    def collect(self, parts: Iterable[BlockIO], n: int) -> BlockIO:
        """The batches ``parts`` (``n`` samples in all) as one stored BlockIO, placed slot by slot."""
        out: Optional[Tuple[Optional[StoredTensor], ...]] = None
        offset = 0
        for part in parts:
            if out is None:
                out = tuple(None if t is None else self.allocate((n,) + tuple(t.shape[1:]), t.dtype) for t in part)
            for slot, t in zip(out, part):
                if slot is None:
                    continue
                if isinstance(slot, OffloadedTensor):
                    slot.write(offset, t)
                else:
                    slot[offset:offset + t.shape[0]].copy_(t)
            offset += io_len(part)
        if out is None or offset != n:
            raise ValueError(f"expected {n} samples of block activations, got {offset}")
        return out

    # -- running block by block --------------------------------------------------------------
    def embed(self, family: ModelFamily, model: nn.Module, images: Tensor, batch_size: int) -> BlockIO:
        """The first block's inputs for ``images`` (anywhere; moved to the device a batch at a time)."""
        with torch.no_grad():
            return self.collect((family.embed(model, images[i:i + batch_size].to(self.device))
                                 for i in range(0, len(images), batch_size)), len(images))

    def run(self, family: ModelFamily, block: nn.Module, io: BlockIO, batch_size: int) -> BlockIO:
        """``block`` run over every sample of ``io`` in batches (no gradients), stored."""
        with torch.no_grad():
            return self.collect((family.run_block(block, part) for part in io_batches(io, batch_size)), io_len(io))


def io_all_finite(io: BlockIO) -> bool:
    """Whether every value of a stored BlockIO is finite (offloaded tensors were checked as written)."""
    return all(t.finite if isinstance(t, OffloadedTensor) else bool(torch.isfinite(t).all())
               for t in io if t is not None)


def where_stored(io: BlockIO) -> Tuple[Optional[str], ...]:
    """``device``, ``host`` or ``disk`` for each slot of a stored BlockIO (None for an empty slot)."""
    return tuple(None if t is None else t.where if isinstance(t, OffloadedTensor) else "device" for t in io)


__all__ = ["parse_size", "MemoryBudget", "ActivationStore", "OffloadedTensor", "HostTensor", "DiskTensor",
           "StoredTensor", "io_all_finite", "where_stored"]

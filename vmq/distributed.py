"""Data parallelism over processes with ``torch.distributed`` (launched by ``torchrun``).

    torchrun --nproc-per-node 8 $(which vmq) quantize --recipe configs/w4a8.yaml --device cuda

Every process holds the whole model (weights are replicated) and a contiguous shard of the
images. A shard is a run of whole batches (:meth:`Dist.batch_shard`): the batches a process runs
are exactly batches one process would run over all the images, so per-image results (logits,
activations) are bit-identical to a one-process run, and counts, minima and maxima reduce to
exactly the one-process figures; float64 sums agree to their last bits (summation order).

:class:`Dist` is a small frozen description of this process's place (rank, world size, the
device collectives run on) with the reductions vmq needs; ``Dist()`` is one process, where every
reduction is the identity. :func:`launch` starts the process group from ``torchrun``'s
environment (gloo on the CPU, NCCL on CUDA) for one command; :meth:`Dist.current` describes a
process group someone else started. :class:`Part` is a process's shard of one image set, with
the global size that losses and random batches are defined over.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from vmq.errors import VmqError

#: environment variables ``torchrun`` sets for each process
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = timedelta(minutes=30)
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group; ``Dist()`` is a single process."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @classmethod
    def current(cls) -> "Dist":
        """The default process group when one is initialised, else a single process."""
        if not (tdist.is_available() and tdist.is_initialized()):
            return cls()
        cuda = tdist.get_backend() == "nccl"
        return cls(tdist.get_rank(), tdist.get_world_size(),
                   torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints results and writes files."""
        return self.rank == 0

    # -- shards -----------------------------------------------------------------------------
    def batch_shard(self, n: int, batch_size: int) -> slice:
        """This rank's contiguous run of whole batches of ``n`` items (earlier ranks take one more
        batch when they do not divide evenly); no padding, no duplicates."""
        batches = math.ceil(n / batch_size)
        per, extra = divmod(batches, self.world)
        first = self.rank * per + min(self.rank, extra)
        count = per + (1 if self.rank < extra else 0)
        return slice(min(n, first * batch_size), min(n, (first + count) * batch_size))

    def check_on_main(self, check: Callable[[], T]) -> Optional[T]:
        """Run ``check`` on rank 0 alone (e.g. that the output can be written there) and return what
        it returns there (None on the other ranks); when it raises :class:`VmqError`, every rank
        stops: rank 0 with that error, the others with one line."""
        error, value = None, None
        if self.is_main:
            try:
                value = check()
            except VmqError as exc:
                error = exc
        if not self.all_true(error is None):
            raise error if error is not None else VmqError(f"rank {self.rank}: stopped, as rank 0 did (its error "
                                                           "says why)")
        return value

    # -- reductions (identity in one process) -------------------------------------------------
    def _reduce(self, t: Tensor, op) -> Tensor:
        if not self.active:
            return t
        buf = t.detach().to(self.comm_device, copy=True)
        flat = buf.view(torch.uint8) if buf.dtype == torch.bool else buf
        tdist.all_reduce(flat, op=op)
        return buf.to(t.device)

    def sum(self, t: Tensor) -> Tensor:
        return self._reduce(t, tdist.ReduceOp.SUM)

    def min(self, t: Tensor) -> Tensor:
        return self._reduce(t, tdist.ReduceOp.MIN)

    def max(self, t: Tensor) -> Tensor:
        return self._reduce(t, tdist.ReduceOp.MAX)

    def sum_int(self, x: int) -> int:
        return int(self.sum(torch.tensor(x, dtype=torch.int64, device="cpu")).item())

    def sum_float(self, x: float) -> float:
        return float(self.sum(torch.tensor(x, dtype=torch.float64, device="cpu")).item())

    def max_float(self, x: float) -> float:
        return float(self.max(torch.tensor(x, dtype=torch.float64, device="cpu")).item())

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (every rank gets the same answer)."""
        return bool(self.min(torch.tensor(int(flag), dtype=torch.int64, device="cpu")).item())

    def gather_cat(self, t: Optional[Tensor], device: Optional[torch.device] = None) -> Optional[Tensor]:
        """Every rank's ``t`` concatenated along dim 0 in rank order, on every rank (on ``t``'s
        device, else ``device``, else the CPU).

        Lengths may differ; a rank may give None (nothing), if some rank gives a tensor. Returns
        None when no rank has one."""
        if not self.active:
            return t
        meta = (tuple(t.shape), t.dtype) if t is not None else None
        metas: List[Optional[Tuple[tuple, torch.dtype]]] = [None] * self.world
        tdist.all_gather_object(metas, meta)
        known = [m for m in metas if m is not None]
        if not known:
            return None
        tail, dtype = known[0][0][1:], known[0][1]
        lengths = [0 if m is None else m[0][0] for m in metas]
        longest = max(lengths)
        buf = torch.zeros((longest, *tail), dtype=dtype, device=self.comm_device)
        if t is not None and t.shape[0]:
            buf[:t.shape[0]] = t.detach().to(self.comm_device)
        wire = buf.view(torch.uint8) if dtype == torch.bool else buf
        parts = [torch.empty_like(wire) for _ in range(self.world)]
        tdist.all_gather(parts, wire)
        device = t.device if t is not None else device if device is not None else torch.device("cpu")
        out = torch.cat([p[:n] for p, n in zip(parts, lengths)])
        return (out.view(torch.bool) if dtype == torch.bool else out).to(device)

    def broadcast_int(self, x: int) -> int:
        """Rank 0's ``x`` on every rank."""
        if not self.active:
            return x
        buf = torch.tensor([x], dtype=torch.int64, device=self.comm_device)
        tdist.broadcast(buf, src=0)
        return int(buf.item())

    def broadcast_bytes(self, data: Optional[bytes]) -> bytes:
        """Rank 0's ``data`` on every rank (the others may give None): files that rank 0 alone reads,
        so that processes on other machines need not see its disk."""
        if not self.active:
            return data if data is not None else b""
        size = self.broadcast_int(len(data) if self.is_main and data is not None else 0)
        if not size:
            return b""
        if self.is_main:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self.comm_device)
        tdist.broadcast(buf, src=0)
        return buf.cpu().numpy().tobytes()

    def broadcast_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's."""
        if not self.active:
            return
        for t in tensors:
            buf = t.detach().to(self.comm_device, copy=True).contiguous()
            wire = buf.view(torch.uint8) if buf.dtype == torch.bool else buf
            tdist.broadcast(wire, src=0)
            with torch.no_grad():
                t.copy_(buf.to(t.device))


SINGLE = Dist()


@dataclass(frozen=True)
class Part:
    """This rank's shard ``[start, stop)`` of ``total`` items (images), and its process group.

    Shards are made of whole units of ``unit`` items (calibration batches): work done one unit at
    a time is the same work whatever the number of processes."""

    dist: Dist
    start: int
    stop: int
    total: int
    unit: int

    @classmethod
    def whole(cls, n: int, unit: int) -> "Part":
        """All ``n`` items, in one process, in units of ``unit``."""
        return cls(SINGLE, 0, n, n, unit)

    @classmethod
    def of(cls, dist: Dist, n: int, batch_size: int, what: str = "calibration") -> "Part":
        """This rank's :meth:`Dist.batch_shard` of ``n`` items; refused (on every rank alike) when
        some rank would get none."""
        if dist.active and math.ceil(n / batch_size) < dist.world:
            raise VmqError(f"{what}: {n} images in batches of {batch_size} make {math.ceil(n / batch_size)} "
                           f"batch(es), fewer than the {dist.world} processes; use more images or a smaller "
                           "batch size")
        s = dist.batch_shard(n, batch_size)
        return cls(dist, s.start, s.stop, n, batch_size)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def unit_rows(self, lo: int, hi: int) -> List[slice]:
        """This process's rows of the global items ``[lo, hi)`` (both on unit boundaries), one
        slice per unit, so that each is read (from wherever the rows are kept) one unit at a time."""
        first, last = max(lo, self.start) - self.start, min(hi, self.stop) - self.start
        return [slice(i, min(i + self.unit, last)) for i in range(first, last, self.unit)]

    def head(self, k: int) -> slice:
        """The local part of the global items ``[0, k)``."""
        return slice(0, max(0, min(k, self.stop) - self.start))


def shard_loader(loader: DataLoader, dist: Dist) -> DataLoader:
    """``loader`` over this rank's :meth:`Dist.batch_shard` of its dataset (in order; possibly
    empty), with the same batch size, workers and collation; ``loader`` itself in one process."""
    if not dist.active:
        return loader
    s = dist.batch_shard(len(loader.dataset), loader.batch_size)
    ds = loader.dataset
    if isinstance(getattr(ds, "indices", None), list) and hasattr(ds, "base"):  # vmq.data.EvalSet: a narrower one
        shard = type(ds)(ds.base, ds.indices[s.start:s.stop])
    else:
        shard = Subset(ds, range(s.start, s.stop))
    workers = loader.num_workers if len(shard) else 0
    return DataLoader(shard, batch_size=loader.batch_size, shuffle=False, num_workers=workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=loader.prefetch_factor if workers > 0 else None)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def _rank_device(device: Optional[str]) -> Optional[str]:
    """Under ``torchrun``: ``cuda`` becomes ``cuda:LOCAL_RANK``; an explicit index only when one
    process runs per node."""
    if device is None or not device.startswith("cuda"):
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        return f"cuda:{local_rank}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise VmqError(f"--device {device}: under torchrun give --device cuda; each process takes the GPU of its "
                       "local rank (LOCAL_RANK)")
    return device


@contextmanager
def launch(device: Optional[str]) -> Iterator[Tuple[Dist, Optional[str]]]:
    """Yield ``(dist, device)`` for one command: under ``torchrun`` (``WORLD_SIZE`` > 1) the process
    group is started from its environment (NCCL for a CUDA device, else gloo) and destroyed at the
    end, and ``device`` is this process's (``cuda`` -> ``cuda:LOCAL_RANK``); otherwise a single
    process and ``device`` unchanged. A process group already running is used as it is."""
    if tdist.is_available() and tdist.is_initialized():
        yield Dist.current(), device
        return
    if not launched():
        yield SINGLE, device
        return
    if not tdist.is_available():
        raise VmqError("this PyTorch has no torch.distributed: run one process")
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise VmqError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start vmq with torchrun")
    device = _rank_device(device)
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield Dist.current(), device
    finally:
        tdist.destroy_process_group()


__all__ = ["Dist", "Part", "SINGLE", "launch", "launched", "shard_loader"]

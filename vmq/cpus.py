"""How many CPUs this process may use, and how OpenMP threads wait: no torch here.

A process may run on fewer CPUs than the machine has: its affinity mask (``taskset``, a
scheduler's cpuset) and its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit:
``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1) both bound it.
:func:`available_cpus` is the smaller of the two; :mod:`vmq.runtime` sizes torch's thread pool
and the data loader's workers from it.

PyTorch's CPU kernels run in an OpenMP team (libgomp in the Linux wheels). Between parallel
regions its threads spin, waiting for the next one, for up to about 300,000 spins before they
sleep. On a machine where another busy process shares the cores that is the worst choice: a
region ends only when its slowest thread ends, the thread that shares its core with the other
process waits for a time slice (milliseconds) while the others spin on theirs, and a step of
hundreds of small regions pays that wait hundreds of times. :func:`openmp_wait_env` gives the
environment that makes waiting threads yield after a short spin (``GOMP_SPINCOUNT``, and
``KMP_BLOCKTIME`` for Intel's OpenMP): idle cores then go idle, and the scheduler moves the
thread that waits for a slice onto them. The OpenMP runtime reads it once, when it loads (with
torch), so the command-line entry point sets it before anything imports torch; a variable the
user set is kept.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

#: spins a waiting OpenMP thread makes before it sleeps. libgomp's default, 300,000, is
#: milliseconds (a spin is a ``pause`` instruction, 10-140 cycles); with a competing process every
#: spin is a stolen core. 1,000 (tens of microseconds) still bridges the gap between two eager
#: operations on a quiet machine, so back-to-back parallel regions find their threads awake;
#: libgomp itself drops to 100-1,000 when it has more threads than CPUs.
GOMP_SPINCOUNT = "1000"
#: the same for Intel's OpenMP (milliseconds a thread stays awake; its default is 200)
KMP_BLOCKTIME = "1"


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of the machine's where there is no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _quota_v2(text: str) -> Optional[float]:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"max 100000"``: none)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list:
    """The cgroup v2 directories whose limits apply to this process: its own, then each parent."""
    own = "/"
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            own = line[3:].strip() or "/"
    dirs, path = [], Path(own)
    while True:
        dirs.append(root / str(path).lstrip("/"))
        if path == path.parent:
            return dirs
        path = path.parent


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when it has none.

    cgroup v2: the smallest ``cpu.max`` of the process's cgroup and its parents (a container
    usually sees its own as the root's). cgroup v1: ``cpu/cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` (a quota of -1: none)."""
    quotas = [q for d in _cgroup_dirs(root, proc_cgroup)
              if (text := _read(d / "cpu.max")) is not None and (q := _quota_v2(text)) is not None]
    if quotas:
        return min(quotas)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
        if quota is None or period is None:
            continue
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        return q / p if q > 0 and p > 0 else None
    return None


def available_cpus(affinity: Optional[int] = None, quota: Optional[float] = None,
                   root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process can use: its affinity mask's, capped by its cgroup quota (rounded up: a
    quota of 1.5 CPUs gives 2 threads, each then gets three quarters of a CPU). At least 1.

    ``affinity`` and ``quota`` replace what the system says (for tests); otherwise they are read."""
    cpus = affinity if affinity is not None else affinity_cpus()
    limit = quota if quota is not None else cgroup_cpu_quota(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit - 1e-9))
    return max(1, cpus)


def processes_per_node(environ: Mapping[str, str] = os.environ) -> int:
    """Processes of one job sharing this machine (torchrun's ``LOCAL_WORLD_SIZE``; else 1)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads(environ: Mapping[str, str] = os.environ, cpus: Optional[int] = None) -> int:
    """Compute threads when ``--threads`` is not given.

    ``OMP_NUM_THREADS`` when the environment sets it (the user's, or torchrun's); else the
    available CPUs (:func:`available_cpus`) shared among the job's processes on this machine."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cpus = cpus if cpus is not None else available_cpus()
    return max(1, cpus // processes_per_node(environ))


def default_workers(cpus: Optional[int] = None, cap: int = 8) -> int:
    """Data loader worker processes when ``--workers`` is not given: one per two available CPUs
    (decoding a small image costs a fraction of a forward), at least one, at most ``cap``; none
    on a single CPU (a worker there only adds hand-over costs)."""
    cpus = cpus if cpus is not None else available_cpus()
    return 0 if cpus < 2 else max(1, min(cap, cpus // 2))


def openmp_wait_env(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The OpenMP wait settings to add to ``environ`` (those it does not set already).

    Nothing when the user chose a wait policy (``OMP_WAIT_POLICY``) or the variables themselves."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    wanted = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT, "KMP_BLOCKTIME": KMP_BLOCKTIME}
    return {k: v for k, v in wanted.items() if k not in environ}


__all__ = ["affinity_cpus", "cgroup_cpu_quota", "available_cpus", "processes_per_node", "default_threads",
           "default_workers", "openmp_wait_env", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"]

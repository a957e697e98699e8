"""How many threads a CPU-heavy job should use: physical cores, never more CPUs than this process may use.

Hyper-threads share a core's arithmetic units, so BLAS-heavy work (ONNX Runtime, torch) gains nothing
from the second thread of a core and loses to the contention; and a process limited by its CPU affinity
or a container's CPU quota that starts one thread per *machine* CPU oversubscribes what it really has
(issue 7: one training epoch took 78 s at torch's default thread count on a busy machine, 4 s on one
thread). `default_threads()` is the number of physical cores among the CPUs this process may run on,
capped by a cgroup CPU quota; `resolve_threads()` turns a `--threads` value (or $UCLIP_THREADS) into
the number to use, never more than the CPUs available.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UclipError

THREADS_ENV = "UCLIP_THREADS"
SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


class ThreadsError(UclipError):
    """A thread count that cannot be used."""


def allowed_cpus() -> set[int]:
    """CPUs this process may run on (its affinity), or range(cpu_count) where affinity is unknown."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows ("quota period" in cpu.max), or None when there is no quota."""
    try:
        quota, period = path.read_text().split()[:2]
        return max(1, math.ceil(int(quota) / int(period))) if quota != "max" else None
    except (OSError, ValueError):
        return None


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPU) -> int | None:
    """Distinct physical cores among `cpus` (hyper-thread siblings count once), or None when unknown."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            siblings = (topology / "core_cpus_list").read_text().strip()
        except OSError:
            try:
                siblings = (topology / "thread_siblings_list").read_text().strip()
            except OSError:
                return None
        cores.add(siblings)
    return len(cores) or None


def available_threads() -> int:
    """CPUs this process can really use: its affinity, capped by a cgroup quota."""
    cpus = len(allowed_cpus())
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def default_threads() -> int:
    """Physical cores this process may use, never more than available_threads()."""
    cores = physical_cores(allowed_cpus()) or available_threads()
    return max(1, min(cores, available_threads()))


def resolve_threads(requested: int | None, *, option: str = "--threads") -> tuple[int, str | None]:
    """(threads to use, a note for the user or None). requested None: $UCLIP_THREADS, else default_threads()."""
    source = option
    if requested is None and os.environ.get(THREADS_ENV):
        source = f"${THREADS_ENV}"
        try:
            requested = int(os.environ[THREADS_ENV])
        except ValueError:
            raise ThreadsError(f"${THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a whole number") from None
    if requested is None:
        return default_threads(), None
    if requested < 1:
        raise ThreadsError(f"{source} {requested}: use at least 1 thread (or leave it out for the physical cores)")
    available = available_threads()
    if requested > available:
        return available, f"note: {source} {requested} is more than the {available} CPUs this process may use: using {available}"
    return requested, None

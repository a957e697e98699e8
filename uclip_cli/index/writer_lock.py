"""The writer lock of an index folder: one process at a time writes an index.

`writer.lock` is flock()ed by the one process allowed to write and holds its pid, so that a second
writer is told who holds it (IndexBusyError) instead of waiting. The kernel releases the lock when the
descriptor closes, a crash included, so a killed writer never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import DISK_FULL, IndexBusyError, IndexReadOnlyError, disk_full

LOCK_FILE = "writer.lock"


def take_writer_lock(index_dir: Path) -> int:
    """The locked descriptor of `index_dir`'s writer lock (close it to release), or a one-line error."""
    try:
        fd = os.open(index_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(index_dir) from None
        raise IndexReadOnlyError(f"cannot write to the index {index_dir} ({e.strerror}): search it, "
                                 "or pass another --index to write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise IndexBusyError(
            f"index {index_dir} is being written by another uclip process (pid {holder}): wait for it to finish"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        if e.errno in DISK_FULL:
            raise disk_full(index_dir) from None
        raise
    return fd

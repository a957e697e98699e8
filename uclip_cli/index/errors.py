"""The index's one error tree, and how the operating system's and SQLite's failures map onto it.

Every failure a user can meet while an index is opened, read or written is one line naming the index
and saying what to do: a full disk, a read-only folder or file system, another writer, a damaged file.
`writes` guards a writing method of the store; `catalogue_error` reads SQLite's exceptions (the catalogue's
connection, catalogue.py, routes every statement through it). uclip's own mistakes (a wrong SQL statement,
a constraint it broke) are not mapped: they stay visible as the bugs they are.
"""
from __future__ import annotations

import errno
import functools
import os
import sqlite3
from pathlib import Path

from ..errors import UclipError


class IndexStoreError(UclipError):
    """An index that cannot be used as asked; the message names it and says what to do."""


class IndexMissingError(IndexStoreError):
    pass


class IndexMismatchError(IndexStoreError):
    """The index holds vectors of another image encoder / preprocessing than the bundle's."""


class IndexBusyError(IndexStoreError):
    """Another process holds the writer lock."""


class IndexCorruptError(IndexStoreError):
    """The index's files contradict each other or are unreadable; the message says how to recover."""


class IndexDiskFullError(IndexStoreError):
    """No space left where the index is written; nothing committed was lost."""


class IndexReadOnlyError(IndexStoreError):
    """The index cannot be written (a read-only file system or folder); it can still be searched."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FULL_BELOW = 1 << 16      # bytes free under which a failed write is put down to a full disk


def _disk_is_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY) or not os.access(folder, os.W_OK)
    except OSError:
        return False


def disk_full(path: Path) -> IndexDiskFullError:
    return IndexDiskFullError(f"disk full at {path}: nothing committed was lost; free some space and run the command again")


def writes(method):
    """A writing method: a full disk or a read-only index is one line; the commit rule keeps the rest."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full(self.path) from None
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise IndexReadOnlyError(f"cannot write to the index {self.path} ({e.strerror}: {e.filename}): "
                                         "search it, or pass another --index to write") from None
            raise IndexStoreError(f"cannot write to the index {self.path} ({e.strerror or e}: {e.filename}): "
                                  "nothing committed was lost; check the disk and run the command again") from None

    return wrapper


MAPPED = sqlite3.DatabaseError                              # what SQLite raises for the file's state ...
BUGS = (sqlite3.ProgrammingError, sqlite3.IntegrityError)   # ... except uclip's own mistakes, which stay visible


def catalogue_error(catalog: Path, e: sqlite3.Error) -> UclipError:
    text = str(e).strip() or type(e).__name__
    lowered = text.lower()
    if "disk is full" in lowered or "disk full" in lowered or (
            ("i/o error" in lowered or "unable to open" in lowered) and _disk_is_full(catalog.parent)):
        return disk_full(catalog.parent)
    if "readonly" in lowered or "read-only" in lowered or ("unable to open" in lowered and _read_only(catalog.parent)):
        return IndexReadOnlyError(f"the index {catalog.parent} is read-only ({text}): search it, or pass another --index to write")
    if "locked" in lowered or "busy" in lowered:
        return IndexBusyError(f"the index {catalog.parent} stayed locked by another process ({text}): try again when it is done")
    return IndexCorruptError(f"the index catalogue {catalog} is damaged ({text}): restore it from a backup, "
                             "or run `uclip index --rebuild` (embeds every photo again)")


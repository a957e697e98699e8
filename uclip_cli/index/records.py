"""The values that cross the index's interface: what a walk knows of a file, what the catalogue holds of
it, and what one batch commits (embedded, reused or failed files). Plain frozen data, no behaviour
beyond the content identity (`content_hash`) that decides whether a file's rows can be reused."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence


class FileStat(Protocol):
    """What the store needs to know about a file on disk (walk.FileEntry is one)."""

    path: os.PathLike | str
    root: os.PathLike | str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FileRecord:
    path: str
    root: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    error: str | None
    row: int | None
    indexed_at: float


@dataclass(frozen=True)
class Embedded:
    """A file that was decoded and encoded: its rows come with the batch's arrays."""

    entry: FileStat
    content_hash: str


@dataclass(frozen=True)
class Reused:
    """A file whose content is already stored (moved, renamed, copied or merely touched)."""

    entry: FileStat
    content_hash: str
    row: int


@dataclass(frozen=True)
class Failed:
    """A file that could not be decoded; it is retried only once its size or mtime changes."""

    entry: FileStat
    error: str
    content_hash: str | None = None


@dataclass(frozen=True)
class IndexStats:
    path: Path
    files: int
    ok: int
    errors: int
    rows: int
    dead_rows: int
    d_clip: int
    d_search: int
    image_fingerprint: str
    heads_fingerprint: str
    bundle_label: str
    bytes_on_disk: int


def content_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The content identity stored in the catalogue: blake2b-128 of the whole file, hex."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_unique_paths(items: Sequence[Embedded | Reused | Failed]) -> None:
    """One batch names each path once (ValueError otherwise): a path is the catalogue's key."""
    paths = [str(item.entry.path) for item in items]
    if len(set(paths)) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"{duplicate} appears twice in one batch")

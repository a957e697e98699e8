"""The values that cross the index's interface: what a walk knows of a file, what the catalogue holds of
it, what one batch commits (embedded, reused or failed files), a photo's metadata (`PhotoMeta`, read
from its header by photo_meta.py) and what a search may filter on (`PhotoFilter`, read by filters.py).
Plain frozen data, no behaviour beyond the content identity (`content_hash`) that decides whether a
file's rows can be reused."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
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
class PhotoMeta:
    """What a photo's header says of it, stored beside its record (catalogue.META_COLUMNS).

    `taken` is the local wall-clock time of capture, "YYYY-MM-DDTHH:MM:SS" (sorts as text, compares with
    a day, month or year prefix): EXIF DateTimeOriginal (with OffsetTimeOriginal as `taken_offset` when the
    camera wrote it), else the file's mtime in this machine's time zone; `taken_source` says which ("exif" |
    "mtime"). `width` x `height` are the pixel size as shown (after the EXIF orientation); `lat`/`lon` are
    signed degrees (south and west negative), both or neither."""

    taken: str
    taken_source: str
    taken_offset: str | None = None
    make: str | None = None
    model: str | None = None
    lens: str | None = None
    orientation: int | None = None
    width: int | None = None
    height: int | None = None
    lat: float | None = None
    lon: float | None = None

    @property
    def camera(self) -> str:
        return " ".join(p for p in (self.make, self.model) if p)


@dataclass(frozen=True)
class Near:
    """Within `km` kilometres of (lat, lon) in degrees."""

    lat: float
    lon: float
    km: float


@dataclass(frozen=True)
class PhotoFilter:
    """Which photos a search may return, by their metadata; every condition given must hold.

    `after` / `before`: capture time from the start of / before the start of a period, as the prefix of a
    `PhotoMeta.taken` ("2019", "2019-06", "2019-06-14"); `cameras`: case-insensitive substrings of make +
    model, all of which must occur; `shape`: "portrait" (taller than wide) or "landscape" (wider than tall);
    `tags`: labels given by `uclip tag` (as photo_tags.label_key folds them), all of which the photo holds."""

    after: str | None = None
    before: str | None = None
    cameras: tuple[str, ...] = ()
    near: tuple[Near, ...] = ()
    has_gps: bool = False
    shape: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == PhotoFilter()

    @property
    def on_metadata(self) -> bool:
        """Some condition reads the photos' metadata (anything but tags)."""
        return replace(self, tags=()) != PhotoFilter()


@dataclass(frozen=True)
class Embedded:
    """A file that was decoded and encoded: its rows come with the batch's arrays."""

    entry: FileStat
    content_hash: str
    meta: PhotoMeta | None = None


@dataclass(frozen=True)
class Reused:
    """A file whose content is already stored (moved, renamed, copied or merely touched)."""

    entry: FileStat
    content_hash: str
    row: int
    meta: PhotoMeta | None = None


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

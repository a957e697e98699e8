"""Which bytes /image and /thumb may send: only what still is the indexed content, inside the indexed
folders, and an image.

The threat (issue 19 item 5): the catalogue names a path, and the server used to open whatever that
path leads to now. Replace an indexed photo by a symlink to ~/.ssh/id_ed25519 and the key came back as
image/jpeg; a photo replaced by other content would also have been thumbnailed and cached under the old
content id. Whoever can write into a photo folder (a synced or shared folder, an unpacked archive) could
read any file of the user running the server.

Every check is made on the descriptor that is then read, so a swap after the checks changes nothing:
1. Where the path leads: resolved (realpath), it must lie inside a folder the index holds (the roots as
   the walk resolved them; a link from one indexed folder into another is fine). The file is opened by
   that resolved name with O_NOFOLLOW, and where the system names an open descriptor's file
   (/proc/self/fd on Linux) that name is checked again: a folder swapped for a link between the two
   steps is caught too. Photos reached through a symlinked folder outside the indexed folders
   (`uclip index --follow-links`) are therefore not served: index the folder itself.
2. What it is: a regular file (fstat; a FIFO or a device is never read from).
3. Whether it is still the indexed content: the size must be the recorded size (another size is other
   content: refused without reading); the recorded mtime too then means unchanged, as `uclip index`
   decides; another mtime (a copy, a touch, a restore) is settled by the content hash, read from the
   descriptor (at most the recorded size) and compared with the photo's id. The catalogue keeps no
   inode: a rewrite in place with the same size and mtime passes, which only the file's owner can
   arrange, inside the indexed folders.
4. That it is an image: its first bytes carry an image signature (images.claimed_format), and the media
   type sent comes from them, never from the name.
A photo none of whose files passes is a one-line 404 ("run `uclip index`") that names no other path.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..images import byte_cap, claimed_format
from .live import NotFound

# Formats every current browser shows as they are (by the signature's format): sent as the original file.
WEB_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WebP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
             "AVIF": "image/avif"}
_HEAD = 32
_CHUNK = 1 << 20
_OPEN_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0))


@dataclass(frozen=True)
class IndexedFile:
    """A file as the catalogue recorded it."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IndexedPhoto:
    """A photo id, the files that held it when indexed, and the folders the index holds."""

    content_id: str
    files: tuple[IndexedFile, ...]
    roots: tuple[str, ...]

    def open(self) -> "Verified":
        """The first file that passes every check (the module docstring), or NotFound with the reasons."""
        reasons = []
        for file in self.files:
            try:
                return _open_checked(self.content_id, file, self.roots)
            except _Refused as e:
                if str(e) not in reasons:
                    reasons.append(str(e))
        raise NotFound(f"the photo cannot be shown now ({'; '.join(reasons) or 'no file'}): run `uclip index`")

    def read_bytes(self) -> tuple[bytes, str]:
        """(the whole checked file, its path) for decoding: a thumbnail is made only of the indexed content."""
        with self.open() as verified:
            return verified.read_all(), str(verified.path)


@dataclass
class Verified:
    """An open descriptor of a file that passed the checks; read it, or hand it to `chunks` (which closes it)."""

    fd: int
    size: int
    format: str
    path: Path

    @property
    def media_type(self) -> str | None:
        """The type to send the file as, or None when browsers cannot show it (HEIC, TIFF: convert it)."""
        return WEB_TYPES.get(self.format)

    def read_all(self) -> bytes:
        return _pread_all(self.fd, self.size)

    def chunks(self, size: int = 1 << 16):
        with os.fdopen(self.fd, "rb") as f:
            while block := f.read(size):
                yield block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Verified":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Refused(Exception):
    """One file of a photo fails a check: the reason, one short clause without paths."""


def _open_checked(content_id: str, file: IndexedFile, roots: tuple[str, ...]) -> Verified:
    real = os.path.realpath(file.path)
    if not _inside(real, roots):
        raise _Refused("it now leads outside the indexed folders")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        raise _Refused(f"it cannot be opened: {e.strerror or e}") from None
    try:
        opened = _descriptor_path(fd)
        if opened is not None and not _inside(opened, roots):
            raise _Refused("it now leads outside the indexed folders")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("it is no longer a regular file")
        if st.st_size != file.size:
            raise _Refused("it changed since it was indexed")
        fmt = claimed_format(os.pread(fd, _HEAD, 0))
        if fmt is None:
            raise _Refused("it is not an image")
        if st.st_size > byte_cap(fmt):
            raise _Refused(f"it is too large for a {fmt} image")
        if st.st_mtime_ns != file.mtime_ns and _content_hash(fd, st.st_size) != content_id:
            raise _Refused("it changed since it was indexed")
        return Verified(fd, st.st_size, fmt, Path(file.path))
    except BaseException:
        os.close(fd)
        raise


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _descriptor_path(fd: int) -> str | None:
    """The path the system holds for an open descriptor (Linux), or None where it cannot say."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return name if name.startswith("/") and not name.endswith(" (deleted)") else None


def _content_hash(fd: int, size: int) -> str:
    """index.records.content_hash of the open file (blake2b-128 of every byte, hex), read by position."""
    h = hashlib.blake2b(digest_size=16)
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _pread_all(fd: int, size: int) -> bytes:
    parts, offset = [], 0
    while offset < size:
        block = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not block:
            break
        parts.append(block)
        offset += len(block)
    return b"".join(parts)

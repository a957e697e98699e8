"""Thumbnails and large views, made on demand from the originals and cached on disk by content id.

- Derived data: `<cache>/thumbnails/<id[:2]>/<id>-<side>.jpg`. Deleting the folder costs time, never a
  result; a thumbnail is written to a temporary name and renamed into place, so a crash never leaves
  half a file under a real name. The id is the content hash the catalogue keeps, so a photo moved or
  copied keeps its thumbnail, and an edited photo (new content, new id once re-indexed) gets a new one.
- Decoding is `images.decode_image`: EXIF orientation applied, JPEGs decoded at 1/2, 1/4 or 1/8 scale
  (DCT scaling, "draft mode") while the short side stays at least the thumbnail's side, HEIC/HEIF when
  the `heif` extra is installed, decompression bombs refused before decoding.
- Work runs in a bounded pool (`workers` threads; Pillow releases the GIL while it decodes and
  resizes) with at most `max_pending` waiting: a page of 100 results queues 100 thumbnails there and
  the request threads that answer queries stay free. Past `max_pending` the answer is Busy (HTTP 503
  with Retry-After), which the page retries. Two requests for one thumbnail share one decode.
"""
from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .live import NotFound, ServeError

THUMB_SIDE = 256            # long side of a grid thumbnail
LARGE_SIDE = 2048           # long side of the large view of a photo browsers cannot show (HEIC, TIFF)
JPEG_QUALITY = 85
# Formats every current browser shows as they are: served as the original file. Others are converted.
WEB_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".jfif": "image/jpeg",
             ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp",
             ".avif": "image/avif"}


class Busy(ServeError):
    """Too many thumbnails waiting: 503, try again in a moment."""

    status = 503


@dataclass(frozen=True)
class Original:
    """An indexed file opened for reading (a regular file, checked on the open descriptor)."""

    fd: int
    size: int
    media_type: str
    path: Path

    def chunks(self, size: int = 1 << 16):
        with os.fdopen(self.fd, "rb") as f:
            while block := f.read(size):
                yield block


def open_original(paths: list[Path]) -> Original | None:
    """The first of `paths` that opens as a regular file of a browser format; None when the photo must be
    converted (HEIC, TIFF); NotFound when none can be read.

    Opened with O_NONBLOCK and checked with fstat on the open descriptor: a file swapped for a FIFO or a
    device after indexing is refused, never read from (a FIFO would hang the request).
    """
    for path in paths:
        media_type = WEB_TYPES.get(path.suffix.lower())
        if media_type is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            continue
        return Original(fd, st.st_size, media_type, path)
    raise NotFound("the photo's file cannot be read now (moved, deleted or not a regular file): run `uclip index`")


class Thumbnails:
    def __init__(self, folder: Path, *, workers: int | None = None, max_pending: int = 256):
        self.folder = Path(folder)
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="uclip-thumbnail")
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], Future] = {}
        self.made = 0           # thumbnails decoded by this process (tests and the benchmark read it)

    def file(self, content_id: str, side: int) -> Path:
        return self.folder / content_id[:2] / f"{content_id}-{side}.jpg"

    def cached(self, content_id: str, side: int) -> Path | None:
        path = self.file(content_id, side)
        return path if path.is_file() else None

    def submit(self, content_id: str, paths: list[Path], side: int) -> Future:
        """A future of the thumbnail's file: made in the pool, or the one being made already."""
        key = (content_id, side)
        with self._lock:
            if key in self._inflight:
                return self._inflight[key]
            if len(self._inflight) >= self.max_pending:
                raise Busy(f"{len(self._inflight)} thumbnails are being made: try again in a moment")
            future = self._pool.submit(self.make, content_id, paths, side)
            self._inflight[key] = future
        future.add_done_callback(lambda _: self._done(key))
        return future

    def _done(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def make(self, content_id: str, paths: list[Path], side: int) -> Path:
        """Decode the first readable file of `paths` and write its thumbnail (long side `side`) into the cache."""
        from PIL import Image

        from ..images import ImageDecodeError, decode_image, read_image_bytes

        target = self.file(content_id, side)
        if target.is_file():
            return target
        reasons = []
        for path in paths:
            try:   # read_image_bytes refuses FIFOs, devices and oversized files without blocking
                image = decode_image(read_image_bytes(path), name=str(path), target_size=max(1, side // 2))
            except (ImageDecodeError, OSError) as e:
                reasons.append(getattr(e, "reason", None) or str(e))
                continue
            image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=2.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                image.save(tmp, "JPEG", quality=JPEG_QUALITY)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            with self._lock:
                self.made += 1
            return target
        raise NotFound(f"the photo cannot be shown now ({'; '.join(reasons) or 'no file'}): run `uclip index`")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

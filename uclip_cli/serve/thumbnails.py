"""Thumbnails and large views, made on demand from the originals and cached on disk by content id.

- Derived data: `<cache>/thumbnails/<id[:2]>/<id>-<side>.jpg`. Deleting the folder costs time, never a
  result; a thumbnail is written to a temporary name and renamed into place, so a crash never leaves
  half a file under a real name. The id is the content hash the catalogue keeps, so a photo moved or
  copied keeps its thumbnail, and an edited photo (new content, new id once re-indexed) gets a new one.
- Only the indexed content is decoded (originals.py checks the file on its descriptor first), so the cache
  never holds a thumbnail of other bytes under a photo's id.
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
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .live import NotFound, ServeError
from .originals import IndexedPhoto

THUMB_SIDE = 256            # long side of a grid thumbnail
LARGE_SIDE = 2048           # long side of the large view of a photo browsers cannot show (HEIC, TIFF)
JPEG_QUALITY = 85
class Busy(ServeError):
    """Too many thumbnails waiting: 503, try again in a moment."""

    status = 503


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

    def submit(self, photo: IndexedPhoto, side: int) -> Future:
        """A future of the thumbnail's file: made in the pool, or the one being made already."""
        key = (photo.content_id, side)
        with self._lock:
            if key in self._inflight:
                return self._inflight[key]
            if len(self._inflight) >= self.max_pending:
                raise Busy(f"{len(self._inflight)} thumbnails are being made: try again in a moment")
            future = self._pool.submit(self.make, photo, side)
            self._inflight[key] = future
        future.add_done_callback(lambda _: self._done(key))
        return future

    def _done(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def make(self, photo: IndexedPhoto, side: int) -> Path:
        """Decode the photo's checked file (originals.py: still the indexed content, inside the indexed folders,
        an image) and write its thumbnail (long side `side`) into the cache under the photo's id."""
        from PIL import Image

        from ..images import ImageDecodeError, decode_image

        target = self.file(photo.content_id, side)
        if target.is_file():
            return target
        data, name = photo.read_bytes()          # NotFound (one line, why) when no file passes the checks
        try:
            image = decode_image(data, name=name, target_size=max(1, side // 2))
        except ImageDecodeError as e:
            raise NotFound(f"the photo cannot be shown now ({e.reason}): run `uclip index`") from None
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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""The image pipeline: list -> read + hash -> decode + preprocess -> batch -> encode -> sink.

Every command that turns image files into vectors runs these stages, and only these:

    uclip index          walk -> Preparer (threads) -> batched -> BatchEncoder -> indexer.IndexSink (the catalogue)
    uclip query IMAGE    Preparer on one file -> the encoder (no sink: one vector)
    uclip eval, train    a file list -> Preparer (threads) -> batched -> BatchEncoder -> FeatureSink (arrays / a file)
    uclip embed (Ray)    a file list in partitions -> Preparer in CPU tasks -> BatchEncoder in actors -> Parquet shards

A stage is a small function or callable object that knows nothing of where its output goes:

- list: `walk.walk_images` (folders; the one list of image extensions, `walk.IMAGE_EXTENSIONS`) or any
  sequence of objects with `path`, `root`, `size`, `mtime_ns` (`FileStat`).
- read + hash: `images.read_image_bytes` (regular files only, opened without blocking, bytes capped by
  the pixel cap and the format, reads time-boxed) and `hash_bytes`, the catalogue's content identity.
- decode + preprocess: `images.decode_image` + `images.preprocess` -> float32 [3, H, W]. `Preparer`
  is read + hash + decode for one file; it never raises for a property of the file, it returns a
  `Prepared` that says what became of it (pixels, content already known, or an error reason).
- `prepare_in_threads`: runs a Preparer over files in daemon threads ahead of the consumer, results
  in input order, and gives a file up (an error, not a hang) when it takes longer than `file_timeout`,
  e.g. a read stuck on a dead network filesystem; the stuck thread is abandoned and replaced.
- `batched`: encoder batches. `BatchEncoder`: frozen features (+ Head_B search vectors) of a batch.
- sink: anything with `write(EncodedBatch)`; `run_pipeline` wires the stages and feeds a sink.

The map part (read -> encode) needs nothing but the bundle: it can run in this process, in threads,
or in Ray tasks and actors elsewhere; only the sink decides what is committed where.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .bundle import ImageSettings
from .index.records import FileStat, PhotoMeta

DEFAULT_FILE_TIMEOUT = 300.0   # seconds one file may take to read + decode before it is given up
_POLL = 0.5                    # how often the consumer looks at a file that has not started yet


@dataclass(frozen=True)
class ListedFile:
    """A file of a file list (not found by a walk): what FileStat asks, filled in by `stat_files`."""

    path: Path
    root: Path
    size: int
    mtime_ns: int
    skip: str | None = None


@dataclass(frozen=True)
class Prepared:
    """One file after read + hash + decode: pixels, or content already known (neither), or an error."""

    entry: FileStat
    content_hash: str | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    meta: PhotoMeta | None = None      # read from the header the decode (or the hash's bytes) already holds

    @property
    def status(self) -> str:
        """"encode" (pixels to encode), "known" (content already stored: reuse it), "failed" (error says why)."""
        if self.error is not None:
            return "failed"
        return "encode" if self.pixels is not None else "known"


# The pixels of a Prepared whose image was encoded elsewhere (a shard of `uclip embed`): its features are in
# the EncodedBatch all the same, so a sink treats it as any file to encode.
ENCODED_ELSEWHERE = np.empty(0, np.float32)


@dataclass
class EncodedBatch:
    """A batch of prepared files and, for those with pixels (in order), their features and vectors."""

    items: list[Prepared]
    features: np.ndarray                 # [n_encoded, d_clip] frozen image features, L2-normalised
    vectors: np.ndarray | None = None    # [n_encoded, d_search] search vectors, when the encoder projects

    @property
    def encoded(self) -> list[Prepared]:
        return [p for p in self.items if p.status == "encode"]


class Sink(Protocol):
    def write(self, batch: EncodedBatch) -> None: ...


def hash_bytes(data: bytes) -> str:
    """The catalogue's content identity: blake2b-128 of the whole file, hex (store.content_hash of bytes read)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Preparer:
    """read + hash + decode + preprocess of one file; never raises for a property of the file.

    known(content_hash) -> True skips decoding content that is already stored (a move, a copy).
    """

    settings: ImageSettings
    known: Callable[[str], bool] | None = None
    uint8: bool = False                                  # pixels as images.resize_crop gives them (to ship elsewhere)
    read: Callable[[str], bytes] | None = None           # images.read_image_bytes, or a remote filesystem's reader

    def __call__(self, entry: FileStat) -> Prepared:
        from .images import ImageDecodeError, decode_photo, preprocess, read_image_bytes, resize_crop   # Pillow: only here
        from .photo_meta import meta_of_bytes

        skip = getattr(entry, "skip", None)
        if skip:                                 # the listing already knows (a FIFO, a broken link)
            return Prepared(entry, error=skip)
        try:
            data = (self.read or read_image_bytes)(entry.path)
        except ImageDecodeError as e:
            return Prepared(entry, error=e.reason)
        digest = hash_bytes(data)
        if self.known is not None and self.known(digest):   # no pixel decoded; its header is in memory already
            return Prepared(entry, digest, meta=meta_of_bytes(data, entry.mtime_ns))
        try:
            image, meta = decode_photo(data, name=str(entry.path), target_size=self.settings.size, mtime_ns=entry.mtime_ns)
            del data
            return Prepared(entry, digest, pixels=(resize_crop if self.uint8 else preprocess)(image, self.settings),
                            meta=meta)
        except ImageDecodeError as e:
            return Prepared(entry, digest, error=e.reason)
        except Exception as e:  # noqa: BLE001 - a decoder bug must not take the run down
            return Prepared(entry, digest, error=f"cannot decode: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------ threads


class _Task:
    __slots__ = ("item", "started", "done", "result", "error")

    def __init__(self, item):
        self.item = item
        self.started: float | None = None
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class _DaemonPool:
    """Worker threads that never block interpreter exit (a thread stuck in read() is abandoned, not joined)."""

    def __init__(self, fn: Callable, workers: int):
        self.fn = fn
        self.tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self.closed = False
        self.threads = 0
        for _ in range(workers):
            self.add_thread()

    def add_thread(self) -> None:
        self.threads += 1
        threading.Thread(target=self._work, name=f"uclip-decode-{self.threads}", daemon=True).start()

    def submit(self, item) -> _Task:
        task = _Task(item)
        self.tasks.put(task)
        return task

    def _work(self) -> None:
        while not self.closed:
            task = self.tasks.get()
            if task is None or self.closed:
                return
            task.started = time.monotonic()
            try:
                task.result = self.fn(task.item)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                task.error = e
            task.done.set()

    def close(self) -> None:
        self.closed = True
        for _ in range(self.threads):
            self.tasks.put(None)


def prepare_in_threads(
    prepare: Callable[[FileStat], Prepared],
    entries: Iterable[FileStat],
    *,
    workers: int,
    window: int | None = None,
    file_timeout: float = DEFAULT_FILE_TIMEOUT,
) -> Iterator[Prepared]:
    """prepare(entry) for every entry, in order, with up to `window` computed ahead in `workers` threads.

    A file whose preparation has run `file_timeout` seconds is given up: it comes out as an error
    ("gave up after N s"), its thread is abandoned (daemon) and replaced, and the run goes on.
    """
    workers = max(1, int(workers))
    window = window or max(8, 4 * workers)
    pool = _DaemonPool(prepare, workers)
    pending: deque[_Task] = deque()
    it = iter(entries)
    try:
        for entry in it:
            pending.append(pool.submit(entry))
            if len(pending) >= window:
                break
        while pending:
            task = pending[0]
            while not task.done.wait(_wait_seconds(task, file_timeout)):
                if task.started is not None and time.monotonic() - task.started >= file_timeout:
                    break
            pending.popleft()
            if task.done.is_set():
                if task.error is not None:
                    raise task.error
                result = task.result
            else:   # stuck: give the file up, keep the pool at full strength
                pool.add_thread()
                result = Prepared(task.item, error=f"unreadable: gave up after {file_timeout:g} s (a hung filesystem?)")
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(nxt))
            yield result
    finally:
        pool.close()


def _wait_seconds(task: _Task, file_timeout: float) -> float:
    if task.started is None:
        return _POLL
    return max(0.01, min(_POLL * 20, task.started + file_timeout - time.monotonic()))


# ------------------------------------------------------------------------------------------ batches


def batched(prepared: Iterable[Prepared], batch_size: int) -> Iterator[list[Prepared]]:
    """Encoder batches: at most `batch_size` files to encode, or 4 x batch_size files without pixels
    (known or failed: cheap to commit, but worth committing now and then); a path never twice in one batch."""
    batch: list[Prepared] = []
    paths: set[str] = set()
    to_encode = 0
    for item in prepared:
        path = str(item.entry.path)
        if path in paths:
            yield batch
            batch, paths, to_encode = [], set(), 0
        batch.append(item)
        paths.add(path)
        to_encode += item.status == "encode"
        if to_encode >= batch_size or len(batch) - to_encode >= 4 * batch_size:
            yield batch
            batch, paths, to_encode = [], set(), 0
    if batch:
        yield batch


@dataclass
class BatchEncoder:
    """Frozen image features (and, with `project`, search vectors through Head_B) of a batch's pixels."""

    image_features: Callable[[np.ndarray], np.ndarray]
    d_clip: int
    project: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def of(cls, encoders, *, project: bool) -> "BatchEncoder":
        """From an `encoders.Encoders`: its image tower, and its projection when `project`."""
        return cls(encoders.image_features, encoders.bundle.dims["clip"], encoders.project_image if project else None)

    def __call__(self, items: list[Prepared]) -> EncodedBatch:
        pixels = [p.pixels for p in items if p.status == "encode"]
        if not pixels:
            return EncodedBatch(items, np.zeros((0, self.d_clip), np.float32))
        features = np.asarray(self.image_features(np.stack(pixels)), dtype=np.float32)
        vectors = None if self.project is None else np.asarray(self.project(features), dtype=np.float32)
        return EncodedBatch(items, features, vectors)


def run_pipeline(
    entries: Iterable[FileStat],
    preparer: Callable[[FileStat], Prepared],
    encoder: Callable[[list[Prepared]], EncodedBatch],
    sink: Sink,
    *,
    workers: int,
    batch_size: int,
    file_timeout: float = DEFAULT_FILE_TIMEOUT,
    on_item: Callable[[Prepared], None] = lambda p: None,
) -> None:
    """Every entry through read -> decode (threads, ahead) -> batch -> encode -> sink.write, in order."""
    prepared = prepare_in_threads(preparer, entries, workers=workers, window=max(2 * batch_size, 4 * workers),
                                  file_timeout=file_timeout)
    for batch in batched(_tap(prepared, on_item), batch_size):
        sink.write(encoder(batch))


def _tap(items: Iterable[Prepared], fn: Callable[[Prepared], None]) -> Iterator[Prepared]:
    for item in items:
        fn(item)
        yield item


def default_workers() -> int:
    return os.cpu_count() or 2


# ------------------------------------------------------------------------------------------ sinks


@dataclass
class FeatureSink:
    """Collects frozen features (and vectors) in memory, in input order, with the failures' reasons.

    `keys` are the entries' paths of the encoded files; `save` writes them as a feature file
    (.npz with `keys` and `features`), atomically.
    """

    entries: list[FileStat] = field(default_factory=list)
    failed: list[tuple[FileStat, str]] = field(default_factory=list)
    _features: list[np.ndarray] = field(default_factory=list)
    _vectors: list[np.ndarray] = field(default_factory=list)

    def write(self, batch: EncodedBatch) -> None:
        for item in batch.items:
            if item.status == "failed":
                self.failed.append((item.entry, item.error or ""))
        self.entries.extend(p.entry for p in batch.encoded)
        if len(batch.features):
            self._features.append(batch.features)
            if batch.vectors is not None:
                self._vectors.append(batch.vectors)

    def features(self, d_clip: int) -> np.ndarray:
        return np.concatenate(self._features) if self._features else np.zeros((0, d_clip), np.float32)

    def vectors(self) -> np.ndarray | None:
        return np.concatenate(self._vectors) if self._vectors else None

    def save(self, path: Path, d_clip: int, keys: Sequence[str] | None = None) -> None:
        save_feature_file(path, keys if keys is not None else [str(e.path) for e in self.entries], self.features(d_clip))


def save_feature_file(path: Path, keys: Sequence[str], features: np.ndarray) -> None:
    """An .npz holding `keys` (str) and `features` (float32 [N, d]), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, keys=np.asarray(list(keys), dtype=str), features=np.asarray(features, dtype=np.float32))
    tmp.replace(path)


def stat_files(paths: Iterable[str | os.PathLike]) -> list[ListedFile]:
    """FileStat entries of a file list; each root is the file's folder. A file that cannot be stat'ed
    is kept, with `skip` saying why, so that it is reported like any other file that failed."""
    out = []
    for p in paths:
        path = Path(p).expanduser().absolute()
        try:
            st = path.stat()
        except OSError as e:
            out.append(ListedFile(path, path.parent, 0, 0, skip=f"unreadable: {e.strerror or e}"))
            continue
        out.append(ListedFile(path, path.parent, st.st_size, st.st_mtime_ns))
    return out

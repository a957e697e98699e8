"""`uclip index`: walk -> read + hash -> decode + preprocess (threads, ahead of the encoder) -> encode -> commit.

Each stage is a small function; `run_index` wires them.  Commits happen once per encoder batch, so an
interrupted run keeps everything before its last batch and a re-run resumes from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .bundle import HEAD_B, IMAGE_ENCODER, Bundle
from .encoders import Encoders
from .images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, preprocess, read_image_bytes
from .progress import Progress
from .sessions import SessionFactory
from .errors import UclipError
from .store import Embedded, Failed, IndexMissingError, IndexStore, Reused
from .walk import FileEntry, WalkWarning, walk_images

REPORT_NAME = "report.json"


@dataclass
class IndexOptions:
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    batch_size: int = 32
    workers: int | None = None
    progress: bool = True
    report_path: Path | None = None
    rebuild: bool = False


@dataclass
class IndexSummary:
    index_path: Path
    seen: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0
    failed: int = 0
    removed: int = 0
    reprojected: int = 0
    total_ok: int = 0
    total_errors: int = 0
    seconds: float = 0.0
    provider: str = ""
    walk_warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None

    def format(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"indexed {self.seen} files in {self.seconds:.1f} s: {self.embedded} embedded ({rate:.1f} images/s on {self.provider or 'no encoder'}), "
            f"{self.reused} reused (content already indexed: moved, renamed, copied or touched), {self.unchanged} unchanged, {self.failed} skipped, {self.removed} removed",
        ]
        if self.reprojected:
            lines.append(f"re-projected {self.reprojected} stored vectors for the bundle's new heads (no image decoded)")
        lines.append(f"index {self.index_path}: {self.total_ok} images searchable, {self.total_errors} files skipped in all")
        lines.extend(f"warning: {w}" for w in self.walk_warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["index_path"] = str(self.index_path)
        d["report_path"] = str(self.report_path) if self.report_path else None
        return d


@dataclass(frozen=True)
class Prepared:
    """A file read and decoded (pixels), known by content (reuse), or failed (error)."""

    entry: FileEntry
    content_hash: str | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


def hash_bytes(data: bytes) -> str:
    """The store's content identity (same as store.content_hash, computed on bytes already read)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def prepare(entry: FileEntry, bundle: Bundle, known: Callable[[str], bool]) -> Prepared:
    """Read, hash and (unless the content is already stored) decode + preprocess one file."""
    try:
        data = read_image_bytes(entry.path)
    except ImageDecodeError as e:
        return Prepared(entry, error=e.reason)
    digest = hash_bytes(data)
    if known(digest):
        return Prepared(entry, digest)
    try:
        image = decode_image(data, name=str(entry.path), target_size=bundle.image.size)
        return Prepared(entry, digest, pixels=preprocess(image, bundle.image))
    except ImageDecodeError as e:
        return Prepared(entry, digest, error=e.reason)
    except Exception as e:  # noqa: BLE001 - a decoder bug must not take the run down
        return Prepared(entry, digest, error=f"cannot decode: {type(e).__name__}: {e}")


def prefetch(executor: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """fn(item) for every item, in order, with up to `window` computed ahead in the pool."""
    pending: deque[Future] = deque()
    it = iter(items)
    for item in it:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(executor.submit(fn, nxt))
        yield result


class BatchWriter:
    """Collects prepared files and commits them to the store one encoder batch at a time."""

    def __init__(self, store: IndexStore, encoders: Encoders, batch_size: int, summary: IndexSummary):
        self.store, self.encoders, self.batch_size, self.summary = store, encoders, batch_size, summary
        self.embed: list[Prepared] = []
        self.reused: list[Reused] = []
        self.failed: list[Failed] = []
        self.paths: set[str] = set()

    def add(self, item: Prepared) -> None:
        if str(item.entry.path) in self.paths:
            self.flush()
        self.paths.add(str(item.entry.path))
        if item.error is not None:
            self.failed.append(Failed(item.entry, item.error, item.content_hash))
        elif item.pixels is None:
            row = self.store.find_by_hash(item.content_hash)
            if row is None:
                raise AssertionError(f"content of {item.entry.path} was reported as stored but has no row")
            self.reused.append(Reused(item.entry, item.content_hash, row))
        else:
            self.embed.append(item)
        if len(self.embed) >= self.batch_size or len(self.reused) + len(self.failed) >= 4 * self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not (self.embed or self.reused or self.failed):
            return
        features = vectors = None
        if self.embed:
            pixels = np.stack([p.pixels for p in self.embed])
            features = self.encoders.image_features(pixels)
            vectors = self.encoders.project_image(features)
        self.store.add_batch(
            [Embedded(p.entry, p.content_hash) for p in self.embed], features, vectors,
            reused=self.reused, failed=self.failed,
        )
        self.summary.embedded += len(self.embed)
        self.summary.reused += len(self.reused)
        self.summary.failed += len(self.failed)
        self.embed, self.reused, self.failed, self.paths = [], [], [], set()


def open_index_for(bundle: Bundle, encoders: Encoders, index_path: Path, *, rebuild: bool = False) -> IndexStore:
    return IndexStore.open(
        index_path, image_fingerprint=bundle.image_fingerprint, heads_fingerprint=bundle.heads_fingerprint,
        d_clip=bundle.dims["clip"], d_search=encoders.search_dim, bundle_label=str(bundle.path), rebuild=rebuild,
    )


def reproject_if_needed(store: IndexStore, bundle: Bundle, encoders: Encoders) -> int:
    """Re-apply the bundle's (new) Head_B to every stored frozen feature; no image is decoded."""
    if not store.needs_reprojection:
        return 0
    store.reproject(encoders.project_image, heads_fingerprint=bundle.heads_fingerprint, d_search=encoders.search_dim)
    return store.rows


class NothingToIndexError(UclipError):
    """`uclip index` without folders, on an index that holds none."""


def indexed_roots(index_path: Path, log: Callable[[str], None]) -> list[Path]:
    """The folders an existing index holds that are present now (an absent one, e.g. an unmounted drive, is kept as is)."""
    try:
        with IndexStore.open(index_path, readonly=True) as store:
            roots = [Path(r) for r in store.roots()]
    except IndexMissingError:
        roots = []
    if not roots:
        raise NothingToIndexError(f"no folders given and the index {index_path} holds none: run `uclip index FOLDER`")
    present = [r for r in roots if r.is_dir()]
    for r in roots:
        if not r.is_dir():
            log(f"note: {r} is not there now (unmounted?): its files stay in the index; `uclip forget {r}` drops them")
    if not present:
        raise NothingToIndexError(f"none of the folders in {index_path} is there now: {', '.join(map(str, roots))}")
    return present


def distinct_roots(roots: list[Path], log: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Resolved roots in the given order, without repeats or folders nested in another root (their files would count twice)."""
    resolved = list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))
    kept = []
    for root in resolved:
        outer = next((r for r in resolved if r != root and root.is_relative_to(r)), None)
        if outer is not None:
            log(f"note: {root} is inside {outer}, which is indexed too: indexing it once")
        else:
            kept.append(root)
    return kept


def run_index(
    roots: list[Path],
    index_path: Path,
    bundle: Bundle,
    sessions: SessionFactory | None = None,
    options: IndexOptions | None = None,
    *,
    log: Callable[[str], None] = lambda m: None,
) -> IndexSummary:
    options = options or IndexOptions()
    started = time.monotonic()
    encoders = Encoders(bundle, sessions)
    summary = IndexSummary(index_path=Path(index_path))
    warnings: list[WalkWarning] = []
    roots = distinct_roots(roots or indexed_roots(index_path, log), log)
    entries_by_root = {root: list(walk_images([root], exclude=options.exclude, include_hidden=options.include_hidden,
                                              extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS], warnings=warnings))
                       for root in roots}
    workers = options.workers or os.cpu_count() or 2
    with open_index_for(bundle, encoders, index_path, rebuild=options.rebuild) as store:
        summary.reprojected = reproject_if_needed(store, bundle, encoders)
        stored_hashes = {r.content_hash for r in store.records() if r.row is not None}
        todo: list[FileEntry] = []
        for root, entries in entries_by_root.items():
            summary.seen += len(entries)
            known = store.known_files(root)
            for entry in entries:
                if known.get(str(entry.path)) == (entry.size, entry.mtime_ns):
                    summary.unchanged += 1
                else:
                    todo.append(entry)
        if todo:
            encoders.preload(IMAGE_ENCODER, *([HEAD_B] if bundle.has_heads else []))
        progress = Progress("indexing", len(todo), enabled=options.progress and bool(todo))
        writer = BatchWriter(store, encoders, options.batch_size, summary)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uclip-decode") as pool:
            try:
                for item in prefetch(pool, lambda e: prepare(e, bundle, stored_hashes.__contains__), todo,
                                     window=max(2 * options.batch_size, 4 * workers)):
                    writer.add(item)
                    progress.advance()
                writer.flush()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        progress.close()
        unreadable = [w.path for w in warnings]
        for root, entries in entries_by_root.items():
            summary.removed += store.remove_missing(entries[0].root if entries else root.resolve(),
                                                    [str(e.path) for e in entries], keep_under=unreadable)
        store.compact()
        stats = store.stats()
        summary.total_ok, summary.total_errors = stats.ok, stats.errors
        summary.report_path = write_report(store, options.report_path or Path(index_path) / REPORT_NAME)
    summary.provider = ", ".join(sorted({m[0] for m in encoders.loaded_providers().values()}))
    summary.walk_warnings = [str(w) for w in warnings]
    summary.seconds = time.monotonic() - started
    return summary


def write_report(store: IndexStore, path: Path) -> Path | None:
    """Every skipped file with its reason, as JSON (written atomically); None when nothing was skipped."""
    skipped = [{"path": r.path, "reason": r.error, "size": r.size} for r in store.errors()]
    path = Path(path)
    if not skipped:
        if path.exists() and path.name == REPORT_NAME:
            path.unlink()
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"skipped": skipped}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def forget_folders(folders: list[Path], index_path: Path) -> dict[Path, int]:
    """Remove every record under each folder (present on disk or not); returns folder -> records removed."""
    removed = {}
    with IndexStore.open(index_path, create=False) as store:
        for folder in folders:
            folder = Path(folder).expanduser().absolute()
            removed[folder] = store.remove_missing(folder.resolve() if folder.exists() else folder, [])
        store.compact()
    return removed

"""The on-disk index: a SQLite catalogue and two append-only float32 row files, the source of truth.

On-disk format (one index directory)
------------------------------------
    catalog.sqlite   SQLite in WAL mode, synchronous=FULL
        meta(key, value)   format_version, image_fingerprint, heads_fingerprint, bundle_label,
                           d_clip, d_search, rows (the committed row count), generation,
                           features_file, vectors_file (names of the live row files), and the values
                           of the derived vector indexes (vector_index.py: e.g. quantized_rows)
        files(path PRIMARY KEY, root, size, mtime_ns, content_hash, status 'ok'|'error', error,
              row, indexed_at)   one record per file seen; status 'ok' <=> row is not NULL
        dead(row PRIMARY KEY, content_hash)   committed rows that no record references any more
    features.f32     frozen CLIP image features, little-endian float32, d_clip per row, row r at byte r*d_clip*4
    vectors.f32      search vectors (Head_B(features), or the features themselves while the bundle has
                     no trained heads), float32, d_search per row
    writer.lock      flock()ed by the one process allowed to write; holds its pid
    ...              the files of the derived vector indexes (INDEX_KINDS: exact_index.py's int8 copy),
                     which this module never reads: it calls them through vector_index.VectorIndex

After a re-projection or a compaction the row files are named features.<g>.f32 / vectors.<g>.f32
(generation g); meta names the live ones, and search must ask the store, never guess a file name.
`IndexStore.search` hands a query to search.py, which picks the vector index that answers.

Invariants: rows 0..rows-1 of each row file are committed and never change in place; each of them is
either referenced by at least one 'ok' record or listed in `dead`, never both. Several records may
share one row (identical content at several paths: a move in progress, or real copies).

Crash-safety argument
---------------------
Only the holder of writer.lock writes. A batch (`add_batch`) (1) truncates both row files to the
committed length and appends its rows there, (2) fsyncs both files, (3) runs ONE SQLite transaction
that writes the batch's records and the new committed row count. The commit is the only moment the
batch becomes visible, and SQLite makes it atomic and (with synchronous=FULL) durable once it returns.
A kill -9 or power loss before (3) completes leaves the old row count: the bytes past it are garbage
from an uncommitted batch, ignored by readers (who map exactly `rows` rows) and truncated by the next
writer's open. After (3) the rows are on disk already (fsynced in step 2), so nothing committed is lost.

Nothing is duplicated: a path is the catalogue's primary key, and a re-run finds every committed
path current (same size and mtime) and skips it.

The derived vector indexes follow the same rule (vector_index.py). In step (2b) each one writes what
covers the new rows past its committed coverage (never over a committed byte) and fsyncs, returning meta
values that the same commit (3) makes live. Before (3): the old coverage, the new bytes are an ignored
tail; after it: durable. The writer's open lets each one verify its committed files against the rows
and repair them (exact_index.py: the int8 copy), then commits what changed.

Re-projection, compaction and rebuild never touch committed files: they write new generation files
(with the derived indexes of the new vectors), fsync them and the directory, then one transaction switches meta to
the new names and coverage (and, for a compaction, renumbers the records' rows). A crash before that
commit leaves the old generation in force (the new files are orphans, deleted by the next writer's open);
after it, the new one.

synchronous=FULL rather than NORMAL: in WAL mode NORMAL may lose the last commits on power loss
(never consistency). A commit happens once per batch of images (seconds of encoding), so the extra
WAL fsync costs well under a millisecond per batch, and "committed" then means durable.

Readers never block and never write: they hold one read transaction (a WAL snapshot) from `open` to
`close` (or until `refresh` moves them to the newest commit), and map the row files (and open the
derived indexes' files) named by that snapshot, so rows, paths and vectors always agree. A writer only writes bytes of the live files past the committed length, which no reader
maps (the one exception: a derived index repairing bytes that failed its check), and unlinks replaced
files (a reader's mapping keeps their content).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .errors import UclipError
from .ann_index import AnnIndex
from .exact_index import ExactIndex
from .filecache import fsync_path
from .vector_index import VectorIndex, VectorSearcher

FORMAT_VERSION = 1
CATALOG = "catalog.sqlite"
LOCK_FILE = "writer.lock"
DTYPE = np.dtype("<f4")
STATUS_OK = "ok"
STATUS_ERROR = "error"
DEFAULT_BATCH = 64            # images per commit a pipeline should use
INDEX_KINDS: tuple[type[VectorIndex], ...] = (ExactIndex, AnnIndex)   # the derived vector indexes kept in step
_SQL_VARS = 500               # rows per "IN (...)" query

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(
    path TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    row INTEGER,
    indexed_at REAL NOT NULL,
    sig INTEGER,
    CHECK ((status = 'ok') = (row IS NOT NULL))
);
CREATE INDEX files_hash ON files(content_hash);
CREATE INDEX files_row ON files(row);
CREATE TABLE dead(row INTEGER PRIMARY KEY, content_hash TEXT);
CREATE INDEX dead_hash ON dead(content_hash);
"""


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


class _Catalog(sqlite3.Connection):
    """The catalogue's connection: a failing SQLite call raises a one-line UclipError naming the index.

    SQLite reports a full disk, a read-only file and a damaged database file (pages that do not parse,
    a table dropped by hand) as exceptions from whichever statement meets them, possibly while rows
    are fetched; each becomes IndexDiskFullError, IndexReadOnlyError or IndexCorruptError.
    """

    catalog: Path

    def execute(self, sql, parameters=()):
        return self.cursor(_Cursor).execute(sql, parameters)

    def executemany(self, sql, parameters):
        return self.cursor(_Cursor).executemany(sql, parameters)


class _Cursor(sqlite3.Cursor):
    def _fail(self, e: sqlite3.DatabaseError) -> Exception:
        return e if isinstance(e, _BUGS) else catalogue_error(self.connection.catalog, e)

    def execute(self, sql, parameters=()):
        try:
            return super().execute(sql, parameters)
        except _MAPPED as e:
            raise self._fail(e) from None

    def executemany(self, sql, parameters):
        try:
            return super().executemany(sql, parameters)
        except _MAPPED as e:
            raise self._fail(e) from None

    def fetchone(self):
        try:
            return super().fetchone()
        except _MAPPED as e:
            raise self._fail(e) from None

    def fetchall(self):
        try:
            return super().fetchall()
        except _MAPPED as e:
            raise self._fail(e) from None

    def __next__(self):
        try:
            return super().__next__()
        except _MAPPED as e:
            raise self._fail(e) from None


def _writes(method):
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


_MAPPED = sqlite3.DatabaseError                              # what SQLite raises for the file's state ...
_BUGS = (sqlite3.ProgrammingError, sqlite3.IntegrityError)   # ... except uclip's own mistakes, which stay visible


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


class IndexStore:
    """One index directory. Open with `IndexStore.open`; use as a context manager or call `close`.

    Not thread-safe: call it from one thread at a time.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None):
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self._meta: dict[str, str] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._searchers: dict[str, VectorSearcher | None] = {}   # a reader's, pinned at open
        self._data_version = 0    # a reader's snapshot: SQLite's data_version when it began
        self.needs_reprojection = False
        self.notes: list[str] = []   # what opening found and did about it (damage repaired, a fallback), one line each
        self.vectors_problem: IndexCorruptError | None = None   # a reader's: why its vectors cannot be searched
        self.damaged_records = 0     # records read whose signature failed (left out of every answer)
        self._signed = True          # the catalogue has the sig column (indexes before it: until the next writer)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        create: bool = True,
        readonly: bool = False,
        rebuild: bool = False,
        image_fingerprint: str | None = None,
        heads_fingerprint: str | None = None,
        d_clip: int | None = None,
        d_search: int | None = None,
        bundle_label: str = "",
        unit_rows: bool = True,
    ) -> "IndexStore":
        """Open (or create) the index at `path`.

        A writer (`readonly=False`) takes the writer lock (IndexBusyError if taken), creates the index
        when `create`, and recovers from any interrupted batch. A reader takes no lock and sees the
        index as it was at open. Fingerprints, when given, are checked: another image fingerprint is
        refused (IndexMismatchError) unless `rebuild` (writer only) empties the index for the new
        bundle; other heads set `needs_reprojection` (a writer then must `reproject` before adding).
        `unit_rows` (creating only): every row is a unit vector (uclip's encoders normalise them), so a
        row of another norm is damage, which search then leaves out and reports.
        """
        path = Path(path).expanduser()
        if readonly:
            return cls._open_reader(path, image_fingerprint, heads_fingerprint, d_clip, bundle_label)
        return cls._open_writer(
            path, create=create, rebuild=rebuild, image_fingerprint=image_fingerprint,
            heads_fingerprint=heads_fingerprint, d_clip=d_clip, d_search=d_search, bundle_label=bundle_label,
            unit_rows=unit_rows,
        )

    @classmethod
    def _open_reader(cls, path, image_fingerprint, heads_fingerprint, d_clip, bundle_label) -> "IndexStore":
        catalog = path / CATALOG
        if not catalog.is_file():
            raise IndexMissingError(f"no index at {path}: run `uclip index DIR` first, or pass --index")
        try:
            store = cls._reader(path, immutable=False)
        except (IndexDiskFullError, IndexReadOnlyError):
            # SQLite's write-ahead log needs a shared-memory file next to the catalogue, which a full disk or a
            # read-only file system cannot give: read the catalogue as a plain file (as of its last checkpoint)
            store = cls._reader(path, immutable=True)
            wal = path / (CATALOG + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                store.notes.append(f"note: {path} is read without its write-ahead log (a full disk or a read-only "
                                   "file system): the last commits of a writer that stopped may be missing")
        try:
            store._check_bundle(image_fingerprint, heads_fingerprint, d_clip, None, bundle_label)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _reader(cls, path: Path, *, immutable: bool) -> "IndexStore":
        conn = _connect(path / CATALOG, immutable=immutable)
        store = cls(path, conn, None)
        try:
            conn.execute("PRAGMA query_only = 1")
            store._begin_snapshot()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _open_writer(cls, path, *, create, rebuild, image_fingerprint, heads_fingerprint,
                     d_clip, d_search, bundle_label, unit_rows=True) -> "IndexStore":
        if not (path / CATALOG).is_file() and not create:
            raise IndexMissingError(f"no index at {path}: run `uclip index DIR` first, or pass --index")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexStoreError(f"cannot create the index folder {path} ({e.strerror}): pass another --index") from None
        lock_fd = _take_writer_lock(path)
        try:
            conn = _connect(path / CATALOG)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(path, conn, lock_fd)
        try:
            store._init_writer(create, rebuild, image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label,
                               unit_rows)
        except BaseException:
            store.close()
            raise
        return store

    @_writes
    def _init_writer(self, create, rebuild, image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label,
                     unit_rows=True) -> None:
        fresh = not _has_meta(self._conn)
        if fresh and not create:
            raise IndexMissingError(f"no index at {self.path}: run `uclip index DIR` first, or pass --index")
        if fresh or rebuild:
            if image_fingerprint is None or heads_fingerprint is None or d_clip is None or d_search is None:
                raise ValueError("creating an index needs image_fingerprint, heads_fingerprint, d_clip and d_search")
            self._reset(image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label, fresh=fresh,
                        unit_rows=unit_rows)
        self._load_meta()
        self._sign_records()
        self._check_bundle(image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label)
        self._recover_row_files()
        if not self.needs_reprojection:
            self._repair_indexes()

    def _reset(self, image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label, *, fresh, unit_rows=True) -> None:
        """Start an empty index (new, or --rebuild) in one commit, with a new generation of row files."""
        old = {} if fresh else _read_meta(self._conn)
        generation = int(old.get("generation", "0")) + (0 if fresh else 1)
        settings = {key: old[key] for kind in INDEX_KINDS for key in kind.settings if key in old}
        names = {"features_file": _row_file_name("features", generation),
                 "vectors_file": _row_file_name("vectors", generation)}
        for name in names.values():
            _create_empty(self.path / name)
        _fsync_dir(self.path)
        meta = {
            "format_version": str(FORMAT_VERSION),
            "image_fingerprint": image_fingerprint,
            "heads_fingerprint": heads_fingerprint,
            "bundle_label": bundle_label,
            "d_clip": str(int(d_clip)),
            "d_search": str(int(d_search)),
            "rows": "0",
            "generation": str(generation),
            "unit_rows": "1" if unit_rows else "0",
            **names,
            **settings,          # the user's settings of the vector indexes outlive a rebuild
        }
        with self._transaction() as c:
            if fresh:
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        c.execute(statement)
            else:
                c.execute("DELETE FROM files")
                c.execute("DELETE FROM dead")
                c.execute("DELETE FROM meta")   # the derived indexes' values too: they start again
            _write_meta(c, meta)

    def _check_bundle(self, image_fingerprint, heads_fingerprint, d_clip, d_search, bundle_label) -> None:
        meta = self._meta
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise IndexMismatchError(
                f"index {self.path} has format version {meta.get('format_version')}, this uclip reads "
                f"{FORMAT_VERSION}: re-index into a new --index, or run `uclip index --rebuild`"
            )
        if image_fingerprint is not None and image_fingerprint != meta["image_fingerprint"]:
            built_by = meta.get("bundle_label") or "another bundle"
            current = f" ({bundle_label})" if bundle_label else ""
            raise IndexMismatchError(
                f"index {self.path} was built with {built_by} (image fingerprint {meta['image_fingerprint']}), "
                f"not with this bundle{current} (image fingerprint {image_fingerprint}): "
                "re-index into a new --index, or run `uclip index --rebuild` to replace it"
            )
        if d_clip is not None and int(d_clip) != self.d_clip:
            raise IndexMismatchError(
                f"index {self.path} stores {self.d_clip}-d features, the bundle gives {d_clip}-d: "
                "re-index into a new --index, or run `uclip index --rebuild`"
            )
        if heads_fingerprint is not None and heads_fingerprint != meta["heads_fingerprint"]:
            self.needs_reprojection = True
        elif d_search is not None and int(d_search) != self.d_search:
            raise IndexCorruptError(
                f"index {self.path} stores {self.d_search}-d vectors for the same heads that give {d_search}-d: "
                "run `uclip index --rebuild`"
            )

    def _recover_row_files(self) -> None:
        """Drop what an interrupted batch, re-projection or compaction left behind."""
        for kind in ("features", "vectors"):
            path = self._row_file(kind)
            committed = self.rows * self._dim(kind) * DTYPE.itemsize
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                actual = -1
            if actual < committed:
                if kind == "vectors" and self._file_rows("features") >= self.rows:
                    self.needs_reprojection = True       # search vectors again from the features: no photo decoded
                    self.notes.append(f"note: {path} is {'missing' if actual < 0 else 'short'}: the search vectors "
                                      "are computed again from the stored image features")
                    continue
                raise self._short_row_file(path, max(actual, 0))
            if actual > committed:
                os.truncate(path, committed)
                fsync_path(path)
        live = self._live_files()
        for leftover in self.path.iterdir():
            derived = any(kind.claims(leftover.name) for kind in INDEX_KINDS)
            if (derived or leftover.name.endswith((".f32", ".f32.tmp"))) and leftover.name not in live:
                leftover.unlink(missing_ok=True)

    def _begin_snapshot(self) -> None:
        """Readers: one read transaction for the store's life, and the row files it names, mapped now."""
        last_missing = None
        for attempt in range(5):
            self._conn.execute("BEGIN")
            if not _has_meta(self._conn):
                self._conn.execute("ROLLBACK")
                raise IndexMissingError(f"no index at {self.path} yet: run `uclip index DIR` first, or pass --index")
            self._load_meta()
            self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            for searcher in self._searchers.values():
                if searcher is not None:
                    searcher.close()
            self._searchers, self.vectors_problem = {}, None
            try:
                self._maps = {"features": self._map("features")}
                try:
                    self._maps["vectors"] = self._map("vectors")
                except IndexCorruptError as e:     # short, while the features are whole: vectors can be computed again
                    self._vectors_unusable(e)
                    return
                self._searchers = {ix.kind: ix.searcher(self._maps["vectors"]) for ix in self.indexes()}
                return
            except FileNotFoundError as e:
                # a writer replaced the generation between our snapshot and the open: look again, unless
                # the same generation names the same missing file again
                missing = (self._meta.get("generation"), e.filename)
                if attempt and missing == last_missing:
                    if Path(e.filename).name == self._meta.get("vectors_file") and "features" in self._maps:
                        self._vectors_unusable(self._missing_row_file(Path(e.filename)))
                        return
                    self._conn.execute("ROLLBACK")
                    raise self._missing_row_file(Path(e.filename)) from None
                self._conn.execute("ROLLBACK")
                last_missing = missing
        raise IndexStoreError(f"index {self.path} keeps changing under this reader: try again")

    def _vectors_unusable(self, problem: IndexCorruptError) -> None:
        """A reader whose vectors file is missing or short while the features are whole: it can list and
        look up, not search; the next writer computes the vectors again (needs_reprojection)."""
        if self._file_rows("features") < self.rows:
            self._conn.execute("ROLLBACK")
            raise problem
        self.vectors_problem = problem
        self.needs_reprojection = True
        self._maps["vectors"] = None

    def _missing_row_file(self, path: Path) -> IndexCorruptError:
        return self._short_row_file(path, None)

    def _short_row_file(self, path: Path, size: int | None) -> IndexCorruptError:
        """The message for a row file that is missing (size None) or holds fewer rows than committed."""
        state = "is missing" if size is None else f"holds {size} bytes, fewer than the {self.rows} rows committed"
        if path.name == self._meta.get("vectors_file") and self._file_rows("features") >= self.rows:
            return IndexCorruptError(f"{path} {state}: run `uclip index` once to compute the search vectors again "
                                     "from the stored image features (no photo is decoded)")
        return IndexCorruptError(f"{path} {state}: restore it, or run `uclip index --rebuild` (embeds every photo again)")

    def _load_meta(self) -> None:
        """Read the catalogue's meta and check it: tables, values, file names, and the row count against
        the records (a wrong count is repaired from them where the row files hold the rows)."""
        catalog = self.path / CATALOG
        tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in ("meta", "files", "dead"):
            if table not in tables:
                raise IndexCorruptError(f"the index catalogue {catalog} is damaged (its table {table!r} is gone): "
                                        "restore it from a backup, or run `uclip index --rebuild` (embeds every photo again)")
        self._signed = "sig" in {column for _, column, *_ in self._conn.execute("PRAGMA table_info(files)")}
        meta = _read_meta(self._conn)
        problem = _meta_problem(meta)
        if problem:
            raise IndexCorruptError(f"the index catalogue {catalog} is damaged ({problem}): restore it from a backup, "
                                    "or run `uclip index --rebuild` (embeds every photo again)")
        self._meta = meta
        self._check_rows()

    def _sign_records(self) -> None:
        """Writer's open: a catalogue written before record signatures gets the column and its signatures."""
        if not self._signed:
            with self._transaction() as c:
                c.execute("ALTER TABLE files ADD COLUMN sig INTEGER")
            self._signed = True
        if self._conn.execute("SELECT 1 FROM files WHERE sig IS NULL LIMIT 1").fetchone():
            with self._transaction() as c:
                c.execute(f"UPDATE files SET sig = uclip_sig({_SIGNED_VALUES}) WHERE sig IS NULL")

    @_writes
    def drop_damaged_records(self) -> list[str]:
        """Delete every record whose signature fails (its photo counts as new to the next `uclip index`),
        and list as dead the committed rows that no record uses any more. Returns the paths dropped."""
        self._require_writer()
        damaged = [(r[0], r[-1]) for r in self._conn.execute(
            f"SELECT {_SIGNED_VALUES}, sig FROM files WHERE sig IS NOT NULL AND sig != uclip_sig({_SIGNED_VALUES})")]
        with self._transaction() as c:
            for path, sig in damaged:
                c.execute("DELETE FROM files WHERE path = ? AND sig = ?", (path, sig))
            orphan = np.ones(self.rows, dtype=bool)
            for sql in ("SELECT row FROM files WHERE row IS NOT NULL AND row < ?", "SELECT row FROM dead WHERE row < ?"):
                orphan[self._fetch_rows(sql, (self.rows,))] = False
            c.executemany("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, NULL)",
                          ((int(r),) for r in np.flatnonzero(orphan)))
            c.execute("DELETE FROM dead WHERE row >= ?", (self.rows,))
            c.execute("DELETE FROM files WHERE row >= ?", (self.rows,))
        return sorted(path for path, _ in damaged)

    def _check_rows(self) -> None:
        """The committed row count must be what the records use (every committed row is referenced by a
        record or listed as dead, and only those are): a count that disagrees was damaged, and truncating
        the row files to it would destroy photos. Use the records' count when the row files hold it
        (a writer commits it, with a note); refuse otherwise."""
        top = self._conn.execute(
            "SELECT MAX(r) FROM (SELECT MAX(row) AS r FROM files UNION ALL SELECT MAX(row) FROM dead)").fetchone()[0]
        recorded = 0 if top is None else int(top) + 1
        raw = self._meta.get("rows", "")
        if raw.isdigit() and int(raw) == recorded:
            return
        features, vectors = self._file_rows("features"), self._file_rows("vectors")
        if recorded > features:
            # records past the row files: damaged records (their signature fails) do not count
            suspects = self._conn.execute(f"SELECT {_RECORD_COLUMNS}, {self._sig_column} FROM files WHERE row >= ?",
                                          (features,)).fetchall()
            if suspects and not any(self._signed_rows(suspects)):
                top = self._conn.execute(
                    "SELECT MAX(r) FROM (SELECT MAX(row) AS r FROM files WHERE row < ? "
                    "UNION ALL SELECT MAX(row) FROM dead WHERE row < ?)", (features, features)).fetchone()[0]
                recorded = 0 if top is None else int(top) + 1
                if raw.isdigit() and int(raw) == recorded:
                    return
        self._meta["rows"] = str(recorded)
        if features < recorded:
            raise IndexCorruptError(
                f"the index {self.path} is damaged: its records use {recorded} rows but {self._row_file('features')} "
                f"holds {features}: restore it, or run `uclip index --rebuild` (embeds every photo again)")
        if vectors < recorded:
            self.needs_reprojection = True      # the search vectors again from the features (a writer does it)
        note = f"note: the catalogue of {self.path} counted {raw!r} rows but its records use {recorded}"
        if self.readonly:
            self.notes.append(note + ": searching those; the next `uclip index` repairs the count")
            return
        with self._transaction() as c:
            _write_meta(c, {"rows": str(recorded)})
        self.notes.append(note + ": repaired")

    def _file_rows(self, kind: str) -> int:
        """Whole rows the named row file holds (0 when it is missing)."""
        try:
            return self._row_file(kind).stat().st_size // (self._dim(kind) * DTYPE.itemsize)
        except OSError:
            return 0

    def refresh(self) -> bool:
        """A reader moves to the newest committed state (a long-lived reader: `uclip serve`).

        Returns True when anything was committed since its snapshot (new rows, removed files, a
        re-projection). Costs one small query when nothing changed; a writer always sees its own state.
        """
        if not self.readonly:
            return False
        seen = self._data_version
        self._conn.execute("ROLLBACK")
        if self._conn.execute("PRAGMA data_version").fetchone()[0] == seen:
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT 1 FROM meta LIMIT 1").fetchone()   # the snapshot starts here
            if self._conn.execute("PRAGMA data_version").fetchone()[0] == seen:
                return False
            self._conn.execute("ROLLBACK")
        self._begin_snapshot()
        return True

    # ------------------------------------------------------------------ properties

    @property
    def readonly(self) -> bool:
        return self._lock_fd is None

    @property
    def rows(self) -> int:
        """Committed rows in each row file (live and dead)."""
        return int(self._meta["rows"])

    @property
    def d_clip(self) -> int:
        return int(self._meta["d_clip"])

    @property
    def d_search(self) -> int:
        return int(self._meta["d_search"])

    @property
    def image_fingerprint(self) -> str:
        return self._meta["image_fingerprint"]

    @property
    def heads_fingerprint(self) -> str:
        return self._meta["heads_fingerprint"]

    @property
    def bundle_label(self) -> str:
        return self._meta.get("bundle_label", "")

    # ------------------------------------------------------------------ reading

    def lookup(self, path: str | os.PathLike) -> FileRecord | None:
        found = self._records("WHERE path = ?", (str(path),))
        return found[0] if found else None

    def _records(self, where: str, args: tuple | list = ()) -> list[FileRecord]:
        """Records whose signature checks out (others are counted in damaged_records and left out)."""
        return [FileRecord(*r[:-1]) for r in self._signed_rows(
            self._conn.execute(f"SELECT {_RECORD_COLUMNS}, {self._sig_column} FROM files {where}", args))]

    def _signed_rows(self, rows: Iterable[tuple]) -> Iterator[tuple]:
        """Rows of (_RECORD_COLUMNS..., sig) whose signature is absent (an older index) or right."""
        for r in rows:
            if r[-1] is None or r[-1] == record_sig(*r[:8]):
                yield r
            else:
                self.damaged_records += 1

    def is_current(self, entry: FileStat) -> bool:
        """True when the file was indexed (or failed) with this size and mtime: nothing to do."""
        record = self.lookup(entry.path)
        return record is not None and record.size == entry.size and record.mtime_ns == entry.mtime_ns

    def roots(self) -> list[str]:
        """The folders whose files the index holds (as given to the walk), sorted."""
        return [r for (r,) in self._conn.execute("SELECT DISTINCT root FROM files ORDER BY root")]

    def known_files(self, root: str | os.PathLike) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every record inside `root`, ok or failed, in one query.

        A pipeline skips a walked entry whose size and mtime match: `is_current` for a whole walk.
        """
        low, high = _prefix_range(_folder_prefix(str(root)))
        return {path: (size, mtime_ns) for path, size, mtime_ns in self._conn.execute(
            "SELECT path, size, mtime_ns FROM files WHERE path >= ? AND path < ?", (low, high)
        )}

    def find_by_hash(self, content_hash: str) -> int | None:
        """A committed row holding this content (live, or dead but not yet compacted away), else None."""
        live = self._records("WHERE content_hash = ? AND row IS NOT NULL AND row < ? LIMIT 4", (content_hash, self.rows))
        if live:
            return live[0].row
        found = self._conn.execute(
            "SELECT row FROM dead WHERE content_hash = ? AND row < ? LIMIT 1", (content_hash, self.rows)
        ).fetchone()
        return found[0] if found else None

    def features(self) -> np.ndarray:
        """Frozen image features of every committed row, [rows, d_clip], read-only memory map."""
        return self._maps["features"] if self.readonly else self._map("features")

    def vectors(self) -> np.ndarray:
        """Search vectors of every committed row, [rows, d_search], read-only memory map.

        Dead rows are included: pass `search_mask()` to the search.
        """
        if self.vectors_problem is not None:
            raise self.vectors_problem
        return self._maps["vectors"] if self.readonly else self._map("vectors")

    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        mask: np.ndarray | None = None,
        min_score: float | None = None,
        info: dict | None = None,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows of `vectors()` for `query`: (rows int64, scores float32), best first.

        search.search decides which vector index answers (`exact`: never an approximate one); scores
        are true cosines. `mask` as from `search_mask()`.
        """
        from .search import search

        if self.vectors_problem is not None:
            raise self.vectors_problem
        return search(self, query, k, mask=mask, min_score=min_score, info=info, exact=exact)

    @property
    def meta(self) -> dict[str, str]:
        """The catalogue's meta values as this store sees them (a reader: as of its snapshot). Read only."""
        return self._meta

    def indexes(self) -> list[VectorIndex]:
        """The derived vector indexes of this index, as the meta seen describes them."""
        return [kind(self.path, self._meta) for kind in INDEX_KINDS]

    def warm(self) -> None:
        """A reader's vector indexes do their first-search checks now (the int8 copy's spot check)."""
        for searcher in self._searchers.values():
            if searcher is not None:
                searcher.warm()

    @_writes
    def set_setting(self, key: str, value: str) -> None:
        """Set one user setting of the vector indexes (e.g. ann_mode = auto | on | off) and bring them in line."""
        self._require_writer()
        owner = next((kind for kind in INDEX_KINDS if key in kind.settings), None)
        if owner is None or value not in owner.settings[key]:
            choices = f"one of {', '.join(owner.settings[key])}" if owner else "not a setting"
            raise IndexStoreError(f"{key} = {value!r}: {choices}")
        owner.check_setting(key, value)
        with self._transaction() as c:
            _write_meta(c, {key: value})
        self._meta[key] = value
        if not self.needs_reprojection:
            self._repair_indexes()

    def index(self, kind: str) -> VectorIndex:
        return next(ix for ix in self.indexes() if ix.kind == kind)

    def searcher(self, kind: str) -> VectorSearcher | None:
        """The `kind` vector index's files opened for search: a reader's as of its snapshot, a writer's now."""
        if self.readonly:
            return self._searchers.get(kind)
        return self.index(kind).searcher(self._map("vectors"))

    def search_mask(self, under: str | os.PathLike | None = None) -> np.ndarray | None:
        """Rows a search may return: None when every row may (no dead rows, no folder), else a bool mask.

        `under` restricts to files inside that folder. Costs one small query in the common case.
        """
        if under is None:
            # a row listed dead while a record uses it is a damaged entry of `dead`: the (signed) record wins
            dead = self._fetch_rows("SELECT row FROM dead WHERE row < ? AND row NOT IN "
                                    "(SELECT row FROM files WHERE row IS NOT NULL)", (self.rows,))
            if dead.size == 0:
                return None
            mask = np.ones(self.rows, dtype=bool)
            mask[dead] = False
            return mask
        mask = np.zeros(self.rows, dtype=bool)
        for prefix in _folder_prefixes(under):
            low, high = _prefix_range(prefix)
            mask[self._fetch_rows(
                "SELECT row FROM files WHERE path >= ? AND path < ? AND row IS NOT NULL AND row < ?",
                (low, high, self.rows),
            )] = True
        return mask

    def paths_for_rows(self, rows: Iterable[int]) -> dict[int, list[str]]:
        """row -> the paths stored at that row (usually one; copies share a row), paths sorted."""
        wanted = [int(r) for r in rows]
        found: dict[int, list[str]] = {}
        for start in range(0, len(wanted), _SQL_VARS):
            part = wanted[start:start + _SQL_VARS]
            marks = ",".join("?" * len(part))
            for record in self._records(f"WHERE row IN ({marks}) ORDER BY path", part):
                found.setdefault(record.row, []).append(record.path)
        return found

    def ids_for_rows(self, rows: Iterable[int]) -> dict[int, str]:
        """row -> the content id (content hash) of the photo stored there: what results carry as "id"."""
        wanted = [int(r) for r in rows]
        found: dict[int, str] = {}
        for start in range(0, len(wanted), _SQL_VARS):
            part = wanted[start:start + _SQL_VARS]
            marks = ",".join("?" * len(part))
            for record in self._records(f"WHERE row IN ({marks}) AND content_hash IS NOT NULL", part):
                found.setdefault(record.row, record.content_hash)
        return found

    def paths_for_id(self, content_id: str) -> list[str]:
        """The indexed paths (status ok) holding this content id, sorted; [] when none does."""
        return [r.path for r in self._records(
            "WHERE content_hash = ? AND row IS NOT NULL AND row < ? ORDER BY path", (content_id, self.rows))]

    def catalogue_problems(self, limit: int = 20) -> list[str]:
        """SQLite's own check of the catalogue file (every page, table and index): [] when it is sound."""
        found = [str(r) for (r,) in self._conn.execute(f"PRAGMA quick_check({int(limit)})")]
        return [] if found == ["ok"] else found

    def live_rows(self) -> np.ndarray:
        """Rows that at least one 'ok' record uses, ascending."""
        return np.unique(self._fetch_rows("SELECT row FROM files WHERE row IS NOT NULL AND row < ?", (self.rows,)))

    def errors(self) -> list[FileRecord]:
        """Files that failed, with their reasons, sorted by path."""
        return self._records("WHERE status = 'error' ORDER BY path")

    def records(self) -> Iterator[FileRecord]:
        """Every record, sorted by path (records whose signature fails are left out: damaged_records)."""
        rows = self._conn.execute(f"SELECT {_RECORD_COLUMNS}, {self._sig_column} FROM files ORDER BY path")
        for r in self._signed_rows(rows):
            yield FileRecord(*r[:-1])

    @property
    def _sig_column(self) -> str:
        return "sig" if self._signed else "NULL"

    def stats(self) -> IndexStats:
        counts = dict(self._conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        dead = self._conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return IndexStats(
            path=self.path, files=sum(counts.values()), ok=counts.get(STATUS_OK, 0),
            errors=counts.get(STATUS_ERROR, 0), rows=self.rows, dead_rows=dead, d_clip=self.d_clip,
            d_search=self.d_search, image_fingerprint=self.image_fingerprint,
            heads_fingerprint=self.heads_fingerprint, bundle_label=self.bundle_label, bytes_on_disk=size,
        )

    # ------------------------------------------------------------------ writing

    @_writes
    def add_batch(
        self,
        embedded: Sequence[Embedded] = (),
        features: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        *,
        reused: Sequence[Reused] = (),
        failed: Sequence[Failed] = (),
    ) -> list[int]:
        """Commit one batch atomically; returns the rows given to `embedded` (in order).

        `features[i]` / `vectors[i]` belong to `embedded[i]`. A record already stored under the same
        path is replaced. Nothing of the batch is visible, nor survives a crash, before this returns.
        """
        self._require_writer()
        if self.needs_reprojection:
            raise IndexStoreError(
                f"index {self.path} holds vectors of other heads: call reproject() before adding files"
            )
        n = len(embedded)
        features = _rows_array(features, n, self.d_clip, "features")
        vectors = _rows_array(vectors, n, self.d_search, "vectors")
        _require_unique_paths([*embedded, *reused, *failed])
        first = self.rows
        if n:
            _append_rows(self._row_file("features"), first, features)
            _append_rows(self._row_file("vectors"), first, vectors)
        derived = self._indexes_add(first + n)
        now = time.time()
        with self._transaction() as c:
            for r in reused:
                self._require_reusable(c, r)
            for i, item in enumerate(embedded):
                self._put(c, item.entry, item.content_hash, STATUS_OK, None, first + i, now)
            for r in reused:
                self._put(c, r.entry, r.content_hash, STATUS_OK, None, r.row, now)
                c.execute("DELETE FROM dead WHERE row = ?", (r.row,))
            for f in failed:
                self._put(c, f.entry, f.content_hash, STATUS_ERROR, f.error, None, now)
            _write_meta(c, {"rows": str(first + n), **derived})
        self._commit_derived(derived, rows=str(first + n))
        return list(range(first, first + n))

    @_writes
    def remove_missing(
        self,
        root: str | os.PathLike,
        seen_paths: Iterable[str | os.PathLike],
        *,
        keep_under: Iterable[str | os.PathLike] = (),
    ) -> int:
        """Forget every record inside `root` whose path is not in `seen_paths` (one commit).

        Call it after a complete walk of `root`. `keep_under` protects folders the walk could not
        read (their files are not known to be gone). Returns how many records were removed.
        """
        self._require_writer()
        low, high = _prefix_range(_folder_prefix(str(root)))
        keep = [_prefix_range(_folder_prefix(str(k))) for k in keep_under]
        with self._transaction() as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS seen(path TEXT PRIMARY KEY)")
            c.execute("DELETE FROM seen")
            c.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((str(p),) for p in seen_paths))
            gone = [
                (path, row, digest) for path, row, digest in c.execute(
                    "SELECT path, row, content_hash FROM files WHERE path >= ? AND path < ? "
                    "AND path NOT IN (SELECT path FROM seen)", (low, high),
                ).fetchall()
                if not any(k_low <= path < k_high for k_low, k_high in keep)
            ]
            for path, row, digest in gone:
                c.execute("DELETE FROM files WHERE path = ?", (path,))
                self._release_row(c, row, digest)
            c.execute("DELETE FROM seen")
        return len(gone)

    @_writes
    def forget_rows(self, rows: Iterable[int]) -> list[str]:
        """Drop every record that uses one of `rows` (their photos count as new to the next `uclip index`,
        which embeds them again) and let the rows die. For rows found damaged beyond repair. Returns the paths."""
        self._require_writer()
        rows = sorted({int(r) for r in rows})
        forgotten: list[str] = []
        with self._transaction() as c:
            for start in range(0, len(rows), _SQL_VARS):
                part = rows[start:start + _SQL_VARS]
                marks = ",".join("?" * len(part))
                gone = c.execute(f"SELECT path, row, content_hash FROM files WHERE row IN ({marks})", part).fetchall()
                for path, row, digest in gone:
                    c.execute("DELETE FROM files WHERE path = ?", (path,))
                    c.execute("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, NULL)", (row,))
                    forgotten.append(path)
        return sorted(forgotten)

    @_writes
    def reproject(
        self,
        project: Callable[[np.ndarray], np.ndarray],
        *,
        heads_fingerprint: str,
        d_search: int,
        chunk_rows: int = 8192,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Recompute every vector as project(features) into a new vectors file; one commit switches to it.

        `project` maps float32 [n, d_clip] to [n, d_search]. No image is decoded. `progress(done, total)`
        is called after each chunk.
        """
        self._require_writer()
        generation = self._generation + 1
        name = _row_file_name("vectors", generation)
        features = self.features()
        with _new_row_file(self.path / name) as out:
            for start in range(0, self.rows, chunk_rows):
                chunk = np.asarray(features[start:start + chunk_rows], dtype=DTYPE)
                out.write(_rows_array(project(chunk), len(chunk), d_search, "projected vectors").tobytes())
                if progress:
                    progress(min(start + chunk_rows, self.rows), self.rows)
        derived = self._indexes_rebuild(name, self.rows, int(d_search))
        self._switch_generation(generation, {"vectors_file": name, "heads_fingerprint": heads_fingerprint,
                                             "d_search": str(int(d_search)), **derived})
        self.needs_reprojection = False

    @_writes
    def compact(self, *, min_dead_share: float = 0.25, chunk_rows: int = 8192) -> int:
        """Rewrite both row files without dead rows when they are at least `min_dead_share` of all rows.

        Renumbers rows: rows obtained before (find_by_hash, add_batch) are invalid afterwards.
        Returns the number of rows dropped (0 when nothing was done).
        """
        self._require_writer()
        dead = self._fetch_rows("SELECT row FROM dead", ())
        if dead.size == 0 or dead.size < min_dead_share * self.rows:
            return 0
        keep = np.ones(self.rows, dtype=bool)
        keep[dead] = False
        old_rows = np.flatnonzero(keep)
        generation = self._generation + 1
        names = {f"{kind}_file": _row_file_name(kind, generation) for kind in ("features", "vectors")}
        for kind in ("features", "vectors"):
            source = self._map(kind)
            with _new_row_file(self.path / names[f"{kind}_file"]) as out:
                for start in range(0, len(old_rows), chunk_rows):
                    out.write(np.ascontiguousarray(source[old_rows[start:start + chunk_rows]]).tobytes())

        def renumber(c: sqlite3.Connection) -> None:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS remap(old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
            c.execute("DELETE FROM remap")
            moved = ((int(o), n) for n, o in enumerate(old_rows) if o != n)
            c.executemany("INSERT INTO remap VALUES (?, ?)", moved)
            new_row = "(SELECT new FROM remap WHERE old = files.row)"
            # a record's signature covers its row: signed again for the new row, unless it failed already
            c.execute(f"UPDATE files SET sig = CASE WHEN sig = uclip_sig({_SIGNED_VALUES}) "
                      f"THEN uclip_sig({_SIGNED_VALUES.replace(', row', ', ' + new_row)}) ELSE sig END, "
                      f"row = {new_row} WHERE row IN (SELECT old FROM remap)")
            c.execute("DELETE FROM remap")
            c.execute("DELETE FROM dead")

        derived = self._indexes_rebuild(names["vectors_file"], len(old_rows), self.d_search)
        self._switch_generation(generation, {**names, "rows": str(len(old_rows)), **derived}, also=renumber)
        return int(dead.size)

    def close(self) -> None:
        if self._conn is not None:
            if self._conn.in_transaction:
                with contextlib.suppress(UclipError):
                    self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None
        self._maps = {}
        for searcher in self._searchers.values():
            if searcher is not None:
                searcher.close()
        self._searchers = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    @property
    def _generation(self) -> int:
        return int(self._meta.get("generation", "0"))

    def _dim(self, kind: str) -> int:
        return self.d_clip if kind == "features" else self.d_search

    def _row_file(self, kind: str) -> Path:
        return self.path / self._meta[f"{kind}_file"]

    def _map(self, kind: str) -> np.ndarray:
        dim, rows, path = self._dim(kind), self.rows, self._row_file(kind)
        if rows == 0:
            if not path.exists():
                raise FileNotFoundError(errno.ENOENT, "row file missing", str(path))
            return np.empty((0, dim), dtype=DTYPE)
        size = path.stat().st_size
        if size < rows * dim * DTYPE.itemsize:
            raise self._short_row_file(path, size)
        return np.memmap(path, dtype=DTYPE, mode="r", shape=(rows, dim))

    def _vectors_map(self, name: str, rows: int, d: int) -> np.ndarray:
        """A read-only map of `rows` rows of the vectors file `name` (committed or just written)."""
        if rows == 0:
            return np.empty((0, d), dtype=DTYPE)
        return np.memmap(self.path / name, dtype=DTYPE, mode="r", shape=(rows, d))

    def _indexes_add(self, rows: int) -> dict[str, str]:
        """Rows up to `rows` are written and fsynced: let every vector index cover them (before the commit)."""
        vectors = self._vectors_map(self._meta["vectors_file"], rows, self.d_search)
        changes: dict[str, str] = {}
        for ix in self.indexes():
            changes.update(ix.add(vectors))
        return changes

    def _indexes_rebuild(self, vectors_file: str, rows: int, d: int) -> dict[str, str]:
        """A new generation's vectors file is written: every vector index builds for it (before the switch)."""
        vectors = self._vectors_map(vectors_file, rows, d)
        changes: dict[str, str] = {}
        for ix in self.indexes():
            changes.update(ix.rebuild(vectors_file, vectors))
        return changes

    def _repair_indexes(self) -> None:
        """Writer's open: every vector index keeps what verifies and rebuilds the rest; one commit."""
        vectors = self._map("vectors")
        changes: dict[str, str] = {}
        for ix in self.indexes():
            changes.update(ix.repair(vectors))
        if changes:
            with self._transaction() as c:
                _write_meta(c, changes)
            self._commit_derived(changes)

    def _commit_derived(self, changes: dict[str, str], **also: str) -> None:
        """After a commit of derived-index values: take them in, and delete the files they replaced."""
        before = self._live_files()
        self._meta.update(changes, **also)
        for name in before - self._live_files():
            (self.path / name).unlink(missing_ok=True)   # a reader that opened it keeps it open

    def _fetch_rows(self, sql: str, args: tuple) -> np.ndarray:
        return np.fromiter((r for (r,) in self._conn.execute(sql, args)), dtype=np.int64)

    def _require_writer(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"index {self.path} was opened read-only")

    @staticmethod
    def _require_reusable(c: sqlite3.Connection, r: Reused) -> None:
        holder = c.execute(
            "SELECT 1 FROM files WHERE row = ? AND content_hash = ? UNION ALL "
            "SELECT 1 FROM dead WHERE row = ? AND content_hash = ? LIMIT 1",
            (r.row, r.content_hash, r.row, r.content_hash),
        ).fetchone()
        if holder is None:
            raise ValueError(f"row {r.row} does not hold content {r.content_hash} (for {r.entry.path}): "
                             "rows from find_by_hash are invalid after compact()")

    def _put(self, c, entry: FileStat, digest, status, error, row, now) -> None:
        path = str(entry.path)
        old = c.execute("SELECT row, content_hash FROM files WHERE path = ?", (path,)).fetchone()
        values = (path, str(entry.root), int(entry.size), int(entry.mtime_ns), digest, status, error, row)
        c.execute(
            "INSERT OR REPLACE INTO files(path, root, size, mtime_ns, content_hash, status, error, row, indexed_at, sig) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*values, now, record_sig(*values)),
        )
        if old is not None and old[0] is not None and old[0] != row:
            self._release_row(c, old[0], old[1])

    @staticmethod
    def _release_row(c: sqlite3.Connection, row: int | None, digest: str | None) -> None:
        """A record stopped using `row`: when no other record uses it, it is dead."""
        if row is None:
            return
        if c.execute("SELECT 1 FROM files WHERE row = ? LIMIT 1", (row,)).fetchone() is None:
            c.execute("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, ?)", (row, digest))

    def _switch_generation(self, generation: int, changes: dict[str, str], also=None) -> None:
        """Make freshly written (fsynced) row files live in one commit; delete the old ones after."""
        _fsync_dir(self.path)
        old = self._live_files()
        with self._transaction() as c:
            if also:
                also(c)
            _write_meta(c, {**changes, "generation": str(generation)})
        self._meta.update(changes, generation=str(generation))
        for name in old - self._live_files():
            (self.path / name).unlink(missing_ok=True)

    def _live_files(self) -> set[str]:
        return {self._meta["features_file"], self._meta["vectors_file"], *(f for ix in self.indexes() for f in ix.files())}

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            if c.in_transaction:          # SQLite may have rolled back itself (a full disk)
                with contextlib.suppress(UclipError):
                    c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")


# ---------------------------------------------------------------------- helpers

_RECORD_COLUMNS = "path, root, size, mtime_ns, content_hash, status, error, row, indexed_at"
_SIGNED_VALUES = "path, root, size, mtime_ns, content_hash, status, error, row"


def record_sig(path, root, size, mtime_ns, content_hash, status, error, row) -> int:
    """A record's signature: 63 bits of blake2b over every field a search or an update relies on.

    SQLite keeps no checksums of its pages' contents: a flipped byte inside a record (a character of a
    path, a digit of a row) leaves a well-formed database that answers wrongly. Each record carries this
    signature; records read for an answer or an update are checked, and one that fails is left out
    (IndexStore.damaged_records; `uclip check --repair` drops it so that the next `uclip index` embeds its
    photo again). Records of indexes written before signatures have none (NULL) until the next writer."""
    h = hashlib.blake2b(digest_size=8)
    for value in (path, root, size, mtime_ns, content_hash, status, error, row):
        h.update(b"\x00" if value is None else b"\x01" + str(value).encode("utf-8", "surrogateescape"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") >> 1


def _connect(catalog: Path, *, immutable: bool = False) -> _Catalog:
    """A connection to the catalogue; `immutable`: read it as a plain read-only file, without the
    write-ahead log's shared memory (a reader on a full disk or a read-only file system)."""
    target = f"file:{urllib.parse.quote(str(catalog))}?mode=ro&immutable=1" if immutable else str(catalog)
    try:
        conn = sqlite3.connect(target, uri=immutable, isolation_level=None, check_same_thread=False, timeout=30,
                               factory=_Catalog)
    except sqlite3.Error as e:
        raise catalogue_error(catalog, e) from None
    conn.catalog = catalog
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.create_function("uclip_sig", 8, record_sig, deterministic=True)
    return conn


def _has_meta(conn: _Catalog) -> bool:
    """True for a catalogue with its tables, False for an empty one; a catalogue with some of them is damaged."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" in tables:
        return True
    if tables & {"files", "dead"}:
        raise IndexCorruptError(f"the index catalogue {conn.catalog} is damaged (its table 'meta' is gone): restore "
                                "it from a backup, or run `uclip index --rebuild` (embeds every photo again)")
    return False


def _read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {str(key): str(value) for key, value in conn.execute("SELECT key, value FROM meta").fetchall()}


REQUIRED_META = ("format_version", "image_fingerprint", "heads_fingerprint", "d_clip", "d_search", "generation",
                 "features_file", "vectors_file")
MAX_DIM = 65_536
_ROW_FILE_NAME = re.compile(r"(features|vectors)(\.[1-9][0-9]*)?\.f32")


def _meta_problem(meta: dict[str, str]) -> str | None:
    """What is wrong with the catalogue's meta values, or None (`rows` is checked against the records)."""
    for key in REQUIRED_META:
        if key not in meta:
            return f"its {key!r} value is gone"
    for key in ("d_clip", "d_search"):
        if not meta[key].isdigit() or not 0 < int(meta[key]) <= MAX_DIM:
            return f"{key} = {meta[key]!r}"
    if not meta["generation"].isdigit():
        return f"generation = {meta['generation']!r}"
    for key, kind in (("features_file", "features"), ("vectors_file", "vectors")):
        match = _ROW_FILE_NAME.fullmatch(meta[key])
        if not match or match.group(1) != kind:
            return f"{key} = {meta[key]!r}, not a row file name"
    return None


def _write_meta(c: sqlite3.Connection, values: dict[str, str]) -> None:
    c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())


def _take_writer_lock(index_dir: Path) -> int:
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


def _row_file_name(kind: str, generation: int) -> str:
    return f"{kind}.f32" if generation == 0 else f"{kind}.{generation}.f32"


def _rows_array(array, n: int, dim: int, what: str) -> np.ndarray:
    if array is None:
        if n == 0:
            return np.empty((0, dim), dtype=DTYPE)
        raise ValueError(f"{what} missing for {n} embedded files")
    array = np.ascontiguousarray(array, dtype=DTYPE)
    if array.shape != (n, dim):
        raise ValueError(f"{what} has shape {array.shape}, expected ({n}, {dim})")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _require_unique_paths(items: Sequence[Embedded | Reused | Failed]) -> None:
    paths = [str(item.entry.path) for item in items]
    if len(set(paths)) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"{duplicate} appears twice in one batch")


def _append_rows(path: Path, first_row: int, rows: np.ndarray) -> None:
    """Write rows after the committed ones (dropping any uncommitted tail) and fsync."""
    offset = first_row * rows.shape[1] * DTYPE.itemsize
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(rows.tobytes())
        f.flush()
        os.fsync(f.fileno())


def _create_empty(path: Path) -> None:
    with open(path, "wb") as f:
        os.fsync(f.fileno())


@contextmanager
def _new_row_file(path: Path):
    """A row file written from scratch and fsynced; removed again if writing fails."""
    f = open(path, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        f.close()
        path.unlink(missing_ok=True)
        raise
    f.close()


def _fsync_dir(path: Path) -> None:
    fsync_path(path)  # O_RDONLY on a directory is allowed, and fsync makes its entries durable


def _folder_prefix(folder: str) -> str:
    return folder if folder.endswith("/") else folder + "/"


def _folder_prefixes(folder: str | os.PathLike) -> set[str]:
    """The folder as typed (made absolute) and resolved: stored paths keep symlinked names below a root."""
    p = Path(folder).expanduser()
    return {_folder_prefix(os.path.abspath(p)), _folder_prefix(str(p.resolve()))}


def _prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high) holding exactly the strings that start with `prefix` (which ends in "/")."""
    return prefix, prefix[:-1] + chr(ord("/") + 1)

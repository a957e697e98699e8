"""The index's catalogue: one SQLite file holding what is known of every photo, and the index's meta.

    catalog.sqlite   SQLite in WAL mode, synchronous=FULL
        meta(key, value)   format_version, image_fingerprint, heads_fingerprint, bundle_label,
                           d_clip, d_search, rows (the committed row count), generation,
                           features_file, vectors_file (names of the live row files), and the values
                           of the derived vector indexes (vector_index.py: e.g. quantized_rows)
        files(path PRIMARY KEY, root, size, mtime_ns, content_hash, status 'ok'|'error', error,
              row, indexed_at, sig,   one record per file seen; status 'ok' <=> row is not NULL
              taken, taken_source, taken_offset, make, model, lens, orientation, width, height, lat, lon)
                                   the photo's metadata (records.PhotoMeta; NULL taken_source: not read yet)
        dead(row PRIMARY KEY, content_hash)   committed rows that no record references any more
        tag_labels, photo_tags, tag_scored    the labels of `uclip tag` and the photos holding them, by content
                                   hash (photo_tags.py; made by the first `uclip tag`, absent before)

Invariants: rows 0..rows-1 are either referenced by at least one 'ok' record or listed in `dead`, never
both. Several records may share one row (identical content at several paths: a move in progress, or
real copies). Nothing is duplicated: a path is the primary key.

A `Catalogue` owns the connection and the meta as its snapshot sees it. Every statement goes through a
connection whose failures are one-line index errors (errors.py). Records carry a signature (`record_sig`):
SQLite checks its pages, not their contents, so a flipped byte inside a record would answer wrongly;
every record read for an answer or an update is checked, and one that fails is left out and counted
(`damaged_records`). Writes happen only inside `transaction()`, one commit per batch (the store decides
when); a reader holds one read transaction (`begin` .. `rollback`) for its whole snapshot.

Photo metadata lives in the record's own row of `files`, written by the same statement and commit as the
record (one commit per batch, as everything else): a replaced or removed record takes its metadata with it,
and a compaction's renumbering keeps it. A catalogue written before metadata gets the columns at the next
writer's open (`describe_records`, as `sign_records` adds `sig`), and its records get their values from
`PhotoDetails.commit_metadata` (photo_details.py: the header alone, no re-embedding: indexer.fill_metadata).
The signature does not cover metadata (it would change every older signature): a flipped byte there
mis-files a photo in a filter, it does not answer with a wrong photo. photo_details.py reads the metadata
and turns filters into row masks.

SQLite's synchronous=FULL rather than NORMAL: in WAL mode NORMAL may lose the last commits on power loss
(never consistency). A commit happens once per batch of images (seconds of encoding), so the extra WAL
fsync costs well under a millisecond per batch, and "committed" then means durable.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import UclipError
from .errors import BUGS, MAPPED, IndexCorruptError, IndexMissingError, catalogue_error
from .records import Embedded, Failed, FileRecord, FileStat, IndexStats, PhotoMeta, Reused
from .rowfiles import ROW_FILE_NAME, RowFiles

CATALOG = "catalog.sqlite"
FORMAT_VERSION = 1
STATUS_OK = "ok"
STATUS_ERROR = "error"
REQUIRED_META = ("format_version", "image_fingerprint", "heads_fingerprint", "d_clip", "d_search", "generation",
                 "features_file", "vectors_file")
MAX_DIM = 65_536
SQL_VARS = 500               # rows per "IN (...)" query
RECORD_COLUMNS = "path, root, size, mtime_ns, content_hash, status, error, row, indexed_at"
SIGNED_VALUES = "path, root, size, mtime_ns, content_hash, status, error, row"
META_COLUMNS = ("taken", "taken_source", "taken_offset", "make", "model", "lens", "orientation", "width", "height",
                "lat", "lon")       # records.PhotoMeta's fields, in order
_META_TYPES = {"orientation": "INTEGER", "width": "INTEGER", "height": "INTEGER", "lat": "REAL", "lon": "REAL"}
DAMAGED = ("restore it from a backup, or run `uclip index --rebuild` (embeds every photo again)")

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
    taken TEXT, taken_source TEXT, taken_offset TEXT, make TEXT, model TEXT, lens TEXT,
    orientation INTEGER, width INTEGER, height INTEGER, lat REAL, lon REAL,
    CHECK ((status = 'ok') = (row IS NOT NULL))
);
CREATE INDEX files_hash ON files(content_hash);
CREATE INDEX files_row ON files(row);
CREATE TABLE dead(row INTEGER PRIMARY KEY, content_hash TEXT);
CREATE INDEX dead_hash ON dead(content_hash);
"""


def record_sig(path, root, size, mtime_ns, content_hash, status, error, row) -> int:
    """A record's signature: 63 bits of blake2b over every field a search or an update relies on.

    Records of indexes written before signatures have none (NULL) until the next writer signs them;
    `uclip check --repair` drops a record whose signature fails, so that the next `uclip index` embeds
    its photo again."""
    data = b"".join(b"\x00\x1f" if value is None else b"\x01" + str(value).encode("utf-8", "surrogateescape") + b"\x1f"
                    for value in (path, root, size, mtime_ns, content_hash, status, error, row))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class _Connection(sqlite3.Connection):
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


def _mapped(method):
    def guarded(self, *args):
        try:
            return method(self, *args)
        except MAPPED as e:
            raise (e if isinstance(e, BUGS) else catalogue_error(self.connection.catalog, e)) from None
    return guarded


class _Cursor(sqlite3.Cursor):
    execute = _mapped(sqlite3.Cursor.execute)
    executemany = _mapped(sqlite3.Cursor.executemany)
    fetchone = _mapped(sqlite3.Cursor.fetchone)
    fetchall = _mapped(sqlite3.Cursor.fetchall)
    __next__ = _mapped(sqlite3.Cursor.__next__)


def write_meta(c: sqlite3.Connection, values: dict[str, str]) -> None:
    c.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())


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
        match = ROW_FILE_NAME.fullmatch(meta[key])
        if not match or match.group(1) != kind:
            return f"{key} = {meta[key]!r}, not a row file name"
    return None


def folder_prefix(folder: str) -> str:
    return folder if folder.endswith("/") else folder + "/"


def folder_prefixes(folder: str | os.PathLike) -> set[str]:
    """The folder as typed (made absolute) and resolved: stored paths keep symlinked names below a root."""
    p = Path(folder).expanduser()
    return {folder_prefix(os.path.abspath(p)), folder_prefix(str(p.resolve()))}


def prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high) holding exactly the strings that start with `prefix` (which ends in "/")."""
    return prefix, prefix[:-1] + chr(ord("/") + 1)


class Catalogue:
    """The catalogue of one index folder: its connection, schema, meta, signed records and folder masks."""

    def __init__(self, folder: Path, *, immutable: bool = False):
        """Connect; `immutable`: read it as a plain read-only file, without the write-ahead log's shared
        memory (a reader on a full disk or a read-only file system)."""
        self.folder = folder
        self.file = folder / CATALOG
        target = f"file:{urllib.parse.quote(str(self.file))}?mode=ro&immutable=1" if immutable else str(self.file)
        try:
            conn = sqlite3.connect(target, uri=immutable, isolation_level=None, check_same_thread=False, timeout=30,
                                   factory=_Connection)
        except sqlite3.Error as e:
            raise catalogue_error(self.file, e) from None
        conn.catalog = self.file
        self._conn: _Connection | None = conn
        self.meta: dict[str, str] = {}
        self.signed = True             # the files table has the sig column (indexes before it: until the next writer)
        self.described = True          # the files table has the metadata columns (the same)
        self.damaged_records = 0       # records read whose signature failed (left out of every answer)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.create_function("uclip_sig", 8, record_sig, deterministic=True)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- lifecycle

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection (statements through it fail as one-line index errors), for views of the records."""
        return self._conn

    def for_writer(self) -> None:
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")

    def for_reader(self) -> None:
        self._conn.execute("PRAGMA query_only = 1")

    def exists(self) -> bool:
        """True for a catalogue with its tables, False for an empty one; one with some of them is damaged."""
        tables = self._tables()
        if "meta" in tables:
            return True
        if tables & {"files", "dead"}:
            raise IndexCorruptError(f"the index catalogue {self.file} is damaged (its table 'meta' is gone): {DAMAGED}")
        return False

    def begin(self) -> int:
        """A reader's snapshot starts (one read transaction); returns SQLite's data_version at its start."""
        self._conn.execute("BEGIN")
        if not self.exists():
            self.rollback()
            raise IndexMissingError(f"no index at {self.folder} yet: run `uclip index DIR` first, or pass --index")
        self.load()
        return self.data_version()

    def changed_since(self, seen: int) -> bool:
        """A reader: has anything been committed since the snapshot of data_version `seen`? Leaves the
        reader in a fresh snapshot when nothing was (one small query), outside any when something was."""
        self.rollback()
        if self.data_version() == seen:
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT 1 FROM meta LIMIT 1").fetchone()   # the snapshot starts here
            if self.data_version() == seen:
                return False
            self.rollback()
        return True

    def data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            with contextlib.suppress(UclipError):
                self._conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn is not None:
            self.rollback()
            self._conn.close()
            self._conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back when it raises."""
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

    # ---------------------------------------------------------------- meta

    @property
    def rows(self) -> int:
        """Committed rows in each row file (live and dead)."""
        return int(self.meta["rows"])

    def load(self) -> None:
        """Read the meta and check the catalogue's shape: tables, values, row file names."""
        tables = self._tables()
        for table in ("meta", "files", "dead"):
            if table not in tables:
                raise IndexCorruptError(f"the index catalogue {self.file} is damaged (its table {table!r} is gone): "
                                        f"{DAMAGED}")
        columns = {column for _, column, *_ in self._conn.execute("PRAGMA table_info(files)")}
        self.signed = "sig" in columns
        self.described = set(META_COLUMNS) <= columns
        meta = self.read_meta()
        problem = _meta_problem(meta)
        if problem:
            raise IndexCorruptError(f"the index catalogue {self.file} is damaged ({problem}): {DAMAGED}")
        self.meta.clear()
        self.meta.update(meta)

    def read_meta(self) -> dict[str, str]:
        return {str(key): str(value) for key, value in self._conn.execute("SELECT key, value FROM meta").fetchall()}

    def commit_meta(self, values: dict[str, str], also: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Write meta values in one commit (with what `also` writes in it) and take them in."""
        with self.transaction() as c:
            if also:
                also(c)
            write_meta(c, values)
        self.meta.update(values)

    def start(self, meta: dict[str, str], *, fresh: bool) -> None:
        """An empty index in one commit: the schema (`fresh`) or every record and meta value dropped (a rebuild)."""
        with self.transaction() as c:
            if fresh:
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        c.execute(statement)
            else:
                c.execute("DELETE FROM files")
                c.execute("DELETE FROM dead")
                c.execute("DELETE FROM meta")   # the derived indexes' values too: they start again
            write_meta(c, meta)

    def check_rows(self, files: RowFiles, *, writer: bool) -> tuple[bool, list[str]]:
        """The committed row count must be what the records use and what the row files hold. Returns (the
        vectors must be computed again from the features, notes)."""
        needs, note = self._count_rows(files, writer=writer)
        notes = [note] if note else []
        held = files.file_rows("features")
        if writer and held < self.rows:
            # cut off (a partial restore, a truncation): the photos of the rows lost are dropped (the next
            # `uclip index` embeds them again), every other photo stays
            notes.append(f"note: {files.path('features')} lost the image features of {len(self.cut_rows(held))} "
                         "photos: dropped from the index; the next `uclip index` embeds them again")
        return needs, notes

    def _count_rows(self, files: RowFiles, *, writer: bool) -> tuple[bool, str | None]:
        """Every committed row is referenced by a record or listed as dead, and only those are: a count that
        disagrees was damaged, and truncating the row files to it would destroy photos. The records' count is
        used when the row files hold it (a writer commits it); refused otherwise."""
        recorded, raw = self._recorded_rows(), self.meta.get("rows", "")
        if raw.isdigit() and int(raw) == recorded:
            return False, None
        features, vectors = files.file_rows("features"), files.file_rows("vectors")
        if recorded > features:
            # records past the row files: damaged records (their signature fails) do not count
            suspects = self._conn.execute(f"SELECT {RECORD_COLUMNS}, {self._sig_column} FROM files WHERE row >= ?",
                                          (features,)).fetchall()
            if suspects and not any(self._signed_rows(suspects)):
                recorded = self._recorded_rows(below=features)
                if raw.isdigit() and int(raw) == recorded:
                    return False, None
        self.meta["rows"] = str(recorded)
        if features < recorded and not writer and vectors < recorded:   # a writer drops what features lost
            raise IndexCorruptError(f"the index {self.folder} is damaged: its records use {recorded} rows but "
                                    f"{files.path('features')} holds {features}: restore it, or run "
                                    "`uclip index --rebuild` (embeds every photo again)")
        note = f"note: the catalogue of {self.folder} counted {raw!r} rows but its records use {recorded}"
        if not writer:
            return vectors < recorded, note + ": searching those; the next `uclip index` repairs the count"
        self.commit_meta({"rows": str(recorded)})
        return vectors < recorded, note + ": repaired"

    def _recorded_rows(self, below: int | None = None) -> int:
        limit = "" if below is None else f" WHERE row < {int(below)}"
        top = self._conn.execute(f"SELECT MAX(r) FROM (SELECT MAX(row) AS r FROM files{limit} "
                                 f"UNION ALL SELECT MAX(row) FROM dead{limit})").fetchone()[0]
        return 0 if top is None else int(top) + 1

    def sign_records(self) -> None:
        """Writer's open: a catalogue written before record signatures gets the column and its signatures."""
        if not self.signed:
            with self.transaction() as c:
                c.execute("ALTER TABLE files ADD COLUMN sig INTEGER")
            self.signed = True
        if self._conn.execute("SELECT 1 FROM files WHERE sig IS NULL LIMIT 1").fetchone():
            with self.transaction() as c:
                c.execute(f"UPDATE files SET sig = uclip_sig({SIGNED_VALUES}) WHERE sig IS NULL")

    def describe_records(self) -> None:
        """Writer's open: a catalogue written before photo metadata gets its columns (NULL: to be read)."""
        if self.described:
            return
        with self.transaction() as c:
            have = {column for _, column, *_ in c.execute("PRAGMA table_info(files)")}
            for column in META_COLUMNS:
                if column not in have:
                    c.execute(f"ALTER TABLE files ADD COLUMN {column} {_META_TYPES.get(column, 'TEXT')}")
        self.described = True

    # ---------------------------------------------------------------- reading records

    def lookup(self, path: str | os.PathLike) -> FileRecord | None:
        found = self._records("WHERE path = ?", (str(path),))
        return found[0] if found else None

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
        low, high = prefix_range(folder_prefix(str(root)))
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

    def search_mask(self, under: str | os.PathLike | None = None) -> np.ndarray | None:
        """Rows a search may return: None when every row may (no dead rows, no folder), else a bool mask.

        `under` restricts to files inside that folder. Costs one small query in the common case.
        """
        if under is None:
            # a row listed dead while a record uses it is a damaged entry of `dead`: the (signed) record wins
            dead = self.fetch_rows("SELECT row FROM dead WHERE row < ? AND row NOT IN "
                                    "(SELECT row FROM files WHERE row IS NOT NULL)", (self.rows,))
            if dead.size == 0:
                return None
            mask = np.ones(self.rows, dtype=bool)
            mask[dead] = False
            return mask
        mask = np.zeros(self.rows, dtype=bool)
        for prefix in folder_prefixes(under):
            low, high = prefix_range(prefix)
            mask[self.fetch_rows(
                "SELECT row FROM files WHERE path >= ? AND path < ? AND row IS NOT NULL AND row < ?",
                (low, high, self.rows),
            )] = True
        return mask

    def ids_and_paths_for_rows(self, rows: Iterable[int]) -> tuple[dict[int, str], dict[int, list[str]]]:
        """(row -> the content id (content hash) of the photo stored there: what results carry as "id",
        row -> the paths stored at that row, sorted: usually one, copies share a row), in one query."""
        ids: dict[int, str] = {}
        paths: dict[int, list[str]] = {}
        for marks, part in in_groups(rows):     # the signed values alone: a page of results makes no records
            query = f"SELECT {SIGNED_VALUES}, {self._sig_column} FROM files WHERE row IN ({marks}) ORDER BY path"
            for path, *_, content_hash, _status, _error, row, _sig in self._signed_rows(self._conn.execute(query, part)):
                paths.setdefault(row, []).append(path)
                if content_hash is not None:
                    ids.setdefault(row, content_hash)
        return ids, paths

    def paths_for_rows(self, rows: Iterable[int]) -> dict[int, list[str]]:
        """row -> the paths stored at that row (usually one; copies share a row), paths sorted."""
        return self.ids_and_paths_for_rows(rows)[1]

    def paths_for_id(self, content_id: str) -> list[str]:
        """The indexed paths (status ok) holding this content id, sorted; [] when none does."""
        return [r.path for r in self._records(
            "WHERE content_hash = ? AND row IS NOT NULL AND row < ? ORDER BY path", (content_id, self.rows))]

    def problems(self, limit: int = 20) -> list[str]:
        """SQLite's own check of the catalogue file (every page, table and index): [] when it is sound."""
        found = [str(r) for (r,) in self._conn.execute(f"PRAGMA quick_check({int(limit)})")]
        return [] if found == ["ok"] else found

    def live_rows(self) -> np.ndarray:
        """Rows that at least one 'ok' record uses, ascending."""
        return np.unique(self.fetch_rows("SELECT row FROM files WHERE row IS NOT NULL AND row < ?", (self.rows,)))

    def dead_rows(self) -> np.ndarray:
        return self.fetch_rows("SELECT row FROM dead", ())

    def errors(self) -> list[FileRecord]:
        """Files that failed, with their reasons, sorted by path."""
        return self._records("WHERE status = 'error' ORDER BY path")

    def records(self) -> Iterator[FileRecord]:
        """Every record, sorted by path (records whose signature fails are left out: damaged_records)."""
        rows = self._conn.execute(f"SELECT {RECORD_COLUMNS}, {self._sig_column} FROM files ORDER BY path")
        for r in self._signed_rows(rows):
            yield FileRecord(*r[:-1])

    def stats(self) -> IndexStats:
        """Counts of records and rows, the meta's identity, and the bytes the index folder holds."""
        counts = dict(self._conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        dead = self._conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
        meta = self.meta
        return IndexStats(
            path=self.folder, files=sum(counts.values()), ok=counts.get(STATUS_OK, 0),
            errors=counts.get(STATUS_ERROR, 0), rows=self.rows, dead_rows=dead, d_clip=int(meta["d_clip"]),
            d_search=int(meta["d_search"]), image_fingerprint=meta["image_fingerprint"],
            heads_fingerprint=meta["heads_fingerprint"], bundle_label=meta.get("bundle_label", ""),
            bytes_on_disk=_bytes_in(self.folder),
        )

    # ---------------------------------------------------------------- writing records

    def commit_batch(self, first: int, embedded: Sequence[Embedded], reused: Sequence[Reused],
                     failed: Sequence[Failed], meta: dict[str, str]) -> None:
        """One batch's records (embedded files at rows first.. in order) and its meta values, in one commit."""
        now = time.time()
        with self.transaction() as c:
            for r in reused:
                _require_reusable(c, r)
            for i, item in enumerate(embedded):
                _put(c, item.entry, item.content_hash, STATUS_OK, None, first + i, now, item.meta)
            for r in reused:
                _put(c, r.entry, r.content_hash, STATUS_OK, None, r.row, now, r.meta)
                c.execute("DELETE FROM dead WHERE row = ?", (r.row,))
            for f in failed:
                _put(c, f.entry, f.content_hash, STATUS_ERROR, f.error, None, now)
            write_meta(c, meta)
        self.meta.update(meta)

    def remove_missing(self, root: str | os.PathLike, seen_paths: Iterable[str | os.PathLike], *,
                       keep_under: Iterable[str | os.PathLike] = ()) -> int:
        """Forget every record inside `root` whose path is not in `seen_paths` (one commit). Call it after a
        complete walk of `root`; `keep_under` protects folders the walk could not read (their files are not
        known to be gone). Returns how many records were removed."""
        low, high = prefix_range(folder_prefix(str(root)))
        keep = [prefix_range(folder_prefix(str(k))) for k in keep_under]
        with self.transaction() as c:
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
                _release_row(c, row, digest)
            c.execute("DELETE FROM seen")
        return len(gone)

    def forget_rows(self, rows: Iterable[int]) -> list[str]:
        """Drop every record that uses one of `rows` (rows found damaged beyond repair: their photos count as
        new to the next `uclip index`) and list the rows dead; returns the paths, sorted."""
        forgotten: list[str] = []
        with self.transaction() as c:
            for marks, part in in_groups(sorted({int(r) for r in rows})):
                gone = c.execute(f"SELECT path, row, content_hash FROM files WHERE row IN ({marks})", part).fetchall()
                for path, row, _ in gone:
                    c.execute("DELETE FROM files WHERE path = ?", (path,))
                    c.execute("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, NULL)", (row,))
                    forgotten.append(path)
        return sorted(forgotten)

    def drop_damaged_records(self) -> list[str]:
        """Delete every record whose signature fails and list as dead the committed rows no record uses
        any more. Returns the paths dropped."""
        damaged = [(r[0], r[-1]) for r in self._conn.execute(
            f"SELECT {SIGNED_VALUES}, sig FROM files WHERE sig IS NOT NULL AND sig != uclip_sig({SIGNED_VALUES})")]
        with self.transaction() as c:
            for path, sig in damaged:
                c.execute("DELETE FROM files WHERE path = ? AND sig = ?", (path, sig))
            orphan = np.ones(self.rows, dtype=bool)
            for sql in ("SELECT row FROM files WHERE row IS NOT NULL AND row < ?", "SELECT row FROM dead WHERE row < ?"):
                orphan[self.fetch_rows(sql, (self.rows,))] = False
            c.executemany("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, NULL)",
                          ((int(r),) for r in np.flatnonzero(orphan)))
            c.execute("DELETE FROM dead WHERE row >= ?", (self.rows,))
            c.execute("DELETE FROM files WHERE row >= ?", (self.rows,))
        return sorted(path for path, _ in damaged)

    def cut_rows(self, n: int) -> list[str]:
        """Rows n.. are lost (a row file holds only n): drop the records that use them and the count to n, in
        one commit. Returns the paths dropped, sorted."""
        with self.transaction() as c:
            gone = sorted(path for (path,) in c.execute("SELECT path FROM files WHERE row >= ?", (n,)).fetchall())
            c.execute("DELETE FROM files WHERE row >= ?", (n,))
            c.execute("DELETE FROM dead WHERE row >= ?", (n,))
            write_meta(c, {"rows": str(n)})
        self.meta["rows"] = str(n)
        return gone

    @staticmethod
    def renumber(c: sqlite3.Connection, kept: np.ndarray) -> None:
        """Inside a compaction's commit: the rows `kept` (ascending) become 0..len-1, and nothing is dead."""
        c.execute("CREATE TEMP TABLE IF NOT EXISTS remap(old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        c.execute("DELETE FROM remap")
        c.executemany("INSERT INTO remap VALUES (?, ?)", ((int(o), n) for n, o in enumerate(kept) if o != n))
        new_row = "(SELECT new FROM remap WHERE old = files.row)"
        # a record's signature covers its row: signed again for the new row, unless it failed already
        c.execute(f"UPDATE files SET sig = CASE WHEN sig = uclip_sig({SIGNED_VALUES}) "
                  f"THEN uclip_sig({SIGNED_VALUES.replace(', row', ', ' + new_row)}) ELSE sig END, "
                  f"row = {new_row} WHERE row IN (SELECT old FROM remap)")
        c.execute("DELETE FROM remap")
        c.execute("DELETE FROM dead")

    # ---------------------------------------------------------------- internals

    def _tables(self) -> set[str]:
        return {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @property
    def _sig_column(self) -> str:
        return "sig" if self.signed else "NULL"

    def _records(self, where: str, args: tuple | list = ()) -> list[FileRecord]:
        """Records whose signature checks out (others are counted in damaged_records and left out)."""
        return [FileRecord(*r[:-1]) for r in self._signed_rows(
            self._conn.execute(f"SELECT {RECORD_COLUMNS}, {self._sig_column} FROM files {where}", args))]

    def _signed_rows(self, rows: Iterable[tuple]) -> Iterator[tuple]:
        """Rows of (RECORD_COLUMNS..., sig) whose signature is absent (an older index) or right."""
        for r in rows:
            if r[-1] is None or r[-1] == record_sig(*r[:8]):
                yield r
            else:
                self.damaged_records += 1

    def fetch_rows(self, sql: str, args: tuple) -> np.ndarray:
        return np.fromiter((r for (r,) in self._conn.execute(sql, args)), dtype=np.int64)


def _bytes_in(folder: Path) -> int:
    """The bytes of the files in `folder` now; files (or the folder) that vanish while it is listed count 0.

    A server reads stats from a snapshot whose folder another process may compact, move or delete at any
    moment: the sum is a report, never a reason to fail the caller.
    """
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:     # moved or deleted (FileNotFoundError), or no longer readable
        return 0
    for entry in entries:
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            continue
    return total


def in_groups(rows: Iterable[int]) -> Iterator[tuple[str, list[int]]]:
    """("?,?,…", rows) groups of at most SQL_VARS rows, for "IN (...)" queries."""
    wanted = [int(r) for r in rows]
    for start in range(0, len(wanted), SQL_VARS):
        part = wanted[start:start + SQL_VARS]
        yield ",".join("?" * len(part)), part


def _require_reusable(c: sqlite3.Connection, r: Reused) -> None:
    holder = c.execute(
        "SELECT 1 FROM files WHERE row = ? AND content_hash = ? UNION ALL "
        "SELECT 1 FROM dead WHERE row = ? AND content_hash = ? LIMIT 1",
        (r.row, r.content_hash, r.row, r.content_hash),
    ).fetchone()
    if holder is None:
        raise ValueError(f"row {r.row} does not hold content {r.content_hash} (for {r.entry.path}): "
                         "rows from find_by_hash are invalid after compact()")


def _put(c: sqlite3.Connection, entry: FileStat, digest, status, error, row, now, meta: PhotoMeta | None = None) -> None:
    path = str(entry.path)
    old = c.execute("SELECT row, content_hash FROM files WHERE path = ?", (path,)).fetchone()
    values = (path, str(entry.root), int(entry.size), int(entry.mtime_ns), digest, status, error, row)
    described = meta_values(meta)
    c.execute(
        f"INSERT OR REPLACE INTO files(path, root, size, mtime_ns, content_hash, status, error, row, indexed_at, sig, "
        f"{', '.join(META_COLUMNS)}) VALUES ({', '.join('?' * (10 + len(META_COLUMNS)))})",
        (*values, now, record_sig(*values), *described),
    )
    if old is not None and old[0] is not None and old[0] != row:
        _release_row(c, old[0], old[1])


def meta_values(meta: PhotoMeta | None) -> tuple:
    return tuple(None if meta is None else getattr(meta, column) for column in META_COLUMNS)


def _release_row(c: sqlite3.Connection, row: int | None, digest: str | None) -> None:
    """A record stopped using `row`: when no other record uses it, it is dead."""
    if row is None:
        return
    if c.execute("SELECT 1 FROM files WHERE row = ? LIMIT 1", (row,)).fetchone() is None:
        c.execute("INSERT OR REPLACE INTO dead(row, content_hash) VALUES (?, ?)", (row, digest))

"""The on-disk index: a catalogue (catalogue.py: catalog.sqlite) and two append-only row files (rowfiles.py),
the source of truth, with the derived vector indexes (vector_index.py) kept in step, and the one writer's
lock (writer_lock.py). `IndexStore` opens, locks, recovers and commits across them; it imports no index
kind and no search policy: the kinds are given (access.open_index gives kinds.INDEX_KINDS) and search.py
takes the store as its source.

Crash-safety argument
---------------------
Only the holder of writer.lock writes. A batch (`add_batch`) (1) truncates both row files to the
committed length and appends its rows there, (2) fsyncs both files, (3) runs ONE SQLite transaction
that writes the batch's records and the new committed row count. The commit is the only moment the
batch becomes visible, and SQLite makes it atomic and (with synchronous=FULL) durable once it returns.
A kill -9 or power loss before (3) completes leaves the old row count: the bytes past it are garbage
from an uncommitted batch, ignored by readers (who map exactly `rows` rows) and truncated by the next
writer's open. After (3) the rows are on disk already (fsynced in step 2), so nothing committed is lost.
A re-run finds every committed path current (same size and mtime) and skips it: nothing is duplicated.

The derived vector indexes follow the same rule (vector_index.py): in step (2b) each writes past its
committed coverage and returns meta values that commit (3) makes live; the writer's open repairs them.

Re-projection, compaction and rebuild never touch committed files: they write new generation files
(with the derived indexes of the new vectors), fsync them and the folder, then one transaction switches
meta to the new names and coverage (and, for a compaction, renumbers the records' rows). A crash before
that commit leaves the old generation in force (the new files are orphans, deleted by the next writer's
open); after it, the new one.

Readers never block and never write: each holds a snapshot (snapshot.py) of one commit, whose files no
writer changes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .catalogue import CATALOG, Catalogue
from .errors import (IndexCorruptError, IndexDiskFullError, IndexMissingError, IndexReadOnlyError, IndexStoreError,
                     writes)
from .identity import IndexIdentity
from .records import Embedded, Failed, IndexStats, Reused, require_unique_paths
from .photo_details import PhotoDetails
from .rowfiles import RowFiles, row_file_name, rows_array
from .snapshot import Snapshot
from .vector_index import VectorIndex, VectorIndexes, VectorSearcher
from .writer_lock import take_writer_lock

if TYPE_CHECKING:
    from ..sessions import SessionFactory

MODES = ("read", "write", "create", "rebuild")
NO_INDEX = "no index at {}: run `uclip index DIR` first, or pass --index"


class IndexStore:
    """One index folder. Open with `IndexStore.open` (or access.open_index); a context manager.

    `catalogue` answers every question about records (paths, rows, folders); the store answers for rows,
    vectors and the derived indexes. Not thread-safe: call it from one thread at a time.
    """

    def __init__(self, folder: Path, catalogue: Catalogue, indexes: VectorIndexes, lock_fd: int | None):
        self.path = folder
        self.catalogue = catalogue
        self.row_files = RowFiles(folder, catalogue.meta)
        self.details = PhotoDetails(catalogue)      # the photos' metadata and tags, and the masks filters make of them
        self.vector_indexes = indexes
        self._lock_fd = lock_fd
        self.needs_reprojection = False
        self.notes: list[str] = []   # what opening found and did about it (damage repaired, a fallback), one line each
        self._snapshot: Snapshot | None = None    # a reader's

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, identity: IndexIdentity | None = None, *, mode: str,
             kinds: Sequence[type[VectorIndex]] = (), sessions: SessionFactory | None = None) -> IndexStore:
        """Open the index at `path` for `identity` (None: unchecked) in `mode`: read (a snapshot, no lock),
        write (an existing index: takes the writer lock, IndexBusyError if taken, and recovers from any
        interrupted batch), create (a writer that creates the index when there is none) or rebuild (a
        writer that empties the index for `identity`, another image encoder too).

        Another image fingerprint is refused (IndexMismatchError) unless rebuilding; other heads set
        `needs_reprojection` (a writer then must `reproject` before adding). `kinds`: the derived vector
        indexes kept; `sessions`: the ONNX Runtime sessions of a kind's kernel (the int8 pass).
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        path = Path(path).expanduser()
        indexes = VectorIndexes(path, kinds, sessions)
        if mode == "read":
            return cls._open_reader(path, identity, indexes)
        return cls._open_writer(path, identity, indexes, mode)

    @classmethod
    def _open_reader(cls, path: Path, identity: IndexIdentity | None, indexes: VectorIndexes) -> IndexStore:
        if not (path / CATALOG).is_file():
            raise IndexMissingError(NO_INDEX.format(path))
        try:
            store = cls._reader(path, identity, indexes, immutable=False)
        except (IndexDiskFullError, IndexReadOnlyError):
            # SQLite's write-ahead log needs a shared-memory file next to the catalogue, which a full disk or a
            # read-only file system cannot give: read the catalogue as a plain file (as of its last checkpoint)
            store = cls._reader(path, identity, indexes, immutable=True)
            wal = path / (CATALOG + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                store.notes.append(f"note: {path} is read without its write-ahead log (a full disk or a read-only "
                                   "file system): the last commits of a writer that stopped may be missing")
        return store

    @classmethod
    def _reader(cls, path: Path, identity: IndexIdentity | None, indexes: VectorIndexes, *, immutable: bool) -> IndexStore:
        store = cls(path, Catalogue(path, immutable=immutable), indexes, None)
        with store._closed_on_error():
            store.catalogue.for_reader()
            store._snapshot = Snapshot(store.catalogue, store.row_files, indexes, store.notes, identity)
            store._snapshot.take()
            store.needs_reprojection |= store._snapshot.stale
        return store

    @classmethod
    def _open_writer(cls, path: Path, identity: IndexIdentity | None, indexes: VectorIndexes, mode: str) -> IndexStore:
        if not (path / CATALOG).is_file() and mode == "write":
            raise IndexMissingError(NO_INDEX.format(path))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexStoreError(f"cannot create the index folder {path} ({e.strerror}): pass another --index") from None
        lock_fd = take_writer_lock(path)
        try:
            catalogue = Catalogue(path)
            catalogue.for_writer()
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(path, catalogue, indexes, lock_fd)
        with store._closed_on_error():
            store._init_writer(identity, mode)
        return store

    @writes
    def _init_writer(self, identity: IndexIdentity | None, mode: str) -> None:
        fresh = not self.catalogue.exists()
        if fresh and mode == "write":
            raise IndexMissingError(NO_INDEX.format(self.path))
        if fresh or mode == "rebuild":
            if identity is None or not identity.complete:
                raise ValueError("creating an index needs image_fingerprint, heads_fingerprint, d_clip and d_search")
            self._start(identity, fresh=fresh)
        self.catalogue.load()
        short_vectors, notes = self.catalogue.check_rows(self.row_files, writer=True)
        self.catalogue.sign_records()
        self.catalogue.describe_records()
        other_heads = identity is not None and identity.needs_reprojection(self.path, self.meta)
        lost_vectors, recovered = self.row_files.recover()
        self.needs_reprojection = short_vectors or other_heads or lost_vectors
        self.notes.extend([*notes, *recovered])
        live = self._live_files()
        for leftover in self.path.iterdir():
            if (self.vector_indexes.claims(leftover.name) or RowFiles.is_row_file(leftover.name)) \
                    and leftover.name not in live:
                leftover.unlink(missing_ok=True)
        if not self.needs_reprojection:
            self._commit_derived(self.vector_indexes.repair(self.meta, self.row_files.map("vectors")))

    def _start(self, identity: IndexIdentity, *, fresh: bool) -> None:
        """An empty index (new, or --rebuild) in one commit, with a new generation of row files; the user's
        settings of the vector indexes outlive a rebuild."""
        old = {} if fresh else self.catalogue.read_meta()
        generation = int(old.get("generation", "0")) + (0 if fresh else 1)
        names = self.row_files.create_empty(generation)
        meta = {**identity.new_meta(), "rows": "0", "generation": str(generation), **names,
                **self.vector_indexes.settings(old)}
        self.catalogue.start(meta, fresh=fresh)

    def refresh(self) -> bool:
        """A reader moves to the newest committed state (a long-lived reader: `uclip serve`); True when
        anything was committed since its snapshot. A writer always sees its own state."""
        if self._snapshot is None or not self._snapshot.refresh():
            return False
        self.needs_reprojection |= self._snapshot.stale
        return True

    # ------------------------------------------------------------------ what it holds

    @property
    def readonly(self) -> bool:
        return self._lock_fd is None

    @property
    def vectors_problem(self) -> IndexCorruptError | None:
        """A reader's: why its vectors cannot be searched (None when they can)."""
        return None if self._snapshot is None else self._snapshot.vectors_problem

    @property
    def meta(self) -> dict[str, str]:
        """The catalogue's meta values as this store sees them (a reader: as of its snapshot). Read only."""
        return self.catalogue.meta

    @property
    def rows(self) -> int:
        """Committed rows in each row file (live and dead)."""
        return self.catalogue.rows

    @property
    def d_clip(self) -> int:
        return int(self.meta["d_clip"])

    @property
    def d_search(self) -> int:
        return int(self.meta["d_search"])

    @property
    def image_fingerprint(self) -> str:
        return self.meta["image_fingerprint"]

    @property
    def heads_fingerprint(self) -> str:
        return self.meta["heads_fingerprint"]

    @property
    def unit_rows(self) -> bool:
        """Every row is a unit vector by construction, so a row of another norm is damage."""
        return self.meta.get("unit_rows", "1") == "1"

    def features(self) -> np.ndarray:
        """Frozen image features of every committed row, [rows, d_clip], read-only memory map."""
        if self._snapshot and self._snapshot.features_problem is not None:
            raise self._snapshot.features_problem
        return self._snapshot.maps["features"] if self._snapshot else self.row_files.map("features")

    def vectors(self) -> np.ndarray:
        """Search vectors of every committed row (dead ones too), [rows, d_search], read-only memory map."""
        if self.vectors_problem is not None:
            raise self.vectors_problem
        return self._snapshot.maps["vectors"] if self._snapshot else self.row_files.map("vectors")

    def indexes(self) -> list[VectorIndex]:
        """The derived vector indexes of this index, as the meta seen describes them."""
        return self.vector_indexes.views(self.meta)

    def index(self, kind: str) -> VectorIndex:
        return self.vector_indexes.view(self.meta, kind)

    def searcher(self, kind: str) -> VectorSearcher | None:
        """The `kind` vector index's files opened for search: a reader's as of its snapshot, a writer's now."""
        if self._snapshot:
            return self._snapshot.searchers.get(kind)
        return self.index(kind).searcher(self.vectors())

    def warm(self) -> None:
        """A reader's vector indexes do their first-search checks now (the int8 copy's spot check)."""
        if self._snapshot:
            self._snapshot.warm()

    def proven_rows(self) -> int:
        """Leading vector rows a search need not check against their checksums: all that a long-lived reader
        verified (warm), else those the int8 pass proves (ExactSearcher.proven_rows)."""
        if self._snapshot and self._snapshot.verified_all():
            return self.rows
        exact = self.searcher("exact")
        return exact.proven_rows() if exact is not None else 0

    def unsound(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` whose stored vector fails its checksum."""
        return self._snapshot.unsound_of(rows) if self._snapshot else self.row_files.unsound("vectors", rows)

    def stats(self) -> IndexStats:
        return self.catalogue.stats()

    # ------------------------------------------------------------------ writing

    @writes
    def add_batch(self, embedded: Sequence[Embedded] = (), features: np.ndarray | None = None,
                  vectors: np.ndarray | None = None, *, reused: Sequence[Reused] = (),
                  failed: Sequence[Failed] = ()) -> list[int]:
        """Commit one batch atomically; returns the rows given to `embedded` (in order). `features[i]` /
        `vectors[i]` belong to `embedded[i]`; a record already stored under the same path is replaced."""
        self._require_writer()
        if self.needs_reprojection:
            raise IndexStoreError(f"index {self.path} holds vectors of other heads: call reproject() before adding files")
        n = len(embedded)
        features = rows_array(features, n, self.d_clip, "features")
        vectors = rows_array(vectors, n, self.d_search, "vectors")
        require_unique_paths([*embedded, *reused, *failed])
        first = self.rows
        if n:
            self.row_files.append(first, features, vectors)
        written = self.row_files.map_file(self.meta["vectors_file"], first + n, self.d_search)
        derived = self.vector_indexes.add(self.meta, written)
        before = self._live_files()
        self.catalogue.commit_batch(first, embedded, reused, failed, {"rows": str(first + n), **derived})
        self._unlink_replaced(before)
        return list(range(first, first + n))

    @writes
    def set_setting(self, key: str, value: str) -> None:
        """Set one user setting of the vector indexes (e.g. ann_mode = auto | on | off) and bring them in line."""
        self._require_writer()
        self.vector_indexes.check_setting(key, value)
        self.catalogue.commit_meta({key: value})
        if not self.needs_reprojection:
            self._commit_derived(self.vector_indexes.repair(self.meta, self.row_files.map("vectors")))

    @writes
    def reproject(self, project: Callable[[np.ndarray], np.ndarray], *, heads_fingerprint: str, d_search: int,
                  chunk_rows: int = 8192, progress: Callable[[int, int], None] | None = None) -> None:
        """Recompute every vector as project(features) (float32 [n, d_clip] -> [n, d_search]; no image is
        decoded) into a new vectors file; one commit switches to it. `progress(done, total)` after each chunk."""
        self._require_writer()
        generation = int(self.meta["generation"]) + 1
        name = row_file_name("vectors", generation)
        unsound = self.row_files.write_projected(name, project, int(d_search), chunk_rows, progress)
        derived = self.vector_indexes.rebuild(self.meta, name, self.row_files.map_file(name, self.rows, int(d_search)))
        self._switch_generation(generation, {"vectors_file": name, "heads_fingerprint": heads_fingerprint,
                                             "d_search": str(int(d_search)), **derived})
        self.needs_reprojection = False
        if unsound.size:
            self.notes.append(f"note: {len(self.catalogue.forget_rows(unsound))} photos had damaged image features "
                              "(their checksums fail): dropped from the index; the next `uclip index` embeds them again")

    @writes
    def compact(self, *, min_dead_share: float = 0.25, chunk_rows: int = 8192) -> int:
        """Rewrite both row files without dead rows when they are at least `min_dead_share` of all rows; returns
        the rows dropped. Renumbers rows: rows obtained before (find_by_hash, add_batch) are invalid after."""
        self._require_writer()
        dead = self.catalogue.dead_rows()
        if dead.size == 0 or dead.size < min_dead_share * self.rows:
            return 0
        keep = np.ones(self.rows, dtype=bool)
        keep[dead] = False
        kept = np.flatnonzero(keep)
        if any(self.row_files.unsound(kind, kept).size for kind in ("features", "vectors")):
            self.notes.append(f"note: {self.path} was not compacted: some rows fail their checksums (copying them "
                              "would hide the damage); run `uclip check --repair`")
            return 0
        generation = int(self.meta["generation"]) + 1
        names = {f"{kind}_file": row_file_name(kind, generation) for kind in ("features", "vectors")}
        self.row_files.write_kept(names, kept, chunk_rows)
        vectors = self.row_files.map_file(names["vectors_file"], len(kept), self.d_search)
        derived = self.vector_indexes.rebuild(self.meta, names["vectors_file"], vectors)
        self._switch_generation(generation, {**names, "rows": str(len(kept)), **derived},
                                also=lambda c: Catalogue.renumber(c, kept))
        return int(dead.size)

    def close(self) -> None:
        self.catalogue.close()
        if self._snapshot:
            self._snapshot.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _commit_derived(self, changes: dict[str, str]) -> None:
        """Writer: commit the derived indexes' new values (if any), and delete the files they replaced."""
        if changes:
            before = self._live_files()
            self.catalogue.commit_meta(changes)
            self._unlink_replaced(before)

    def _switch_generation(self, generation: int, changes: dict[str, str], also=None) -> None:
        """Make freshly written (fsynced) row files live in one commit; delete the old ones after."""
        self.row_files.fsync_folder()
        before = self._live_files()
        self.catalogue.commit_meta({**changes, "generation": str(generation)}, also=also)
        self._unlink_replaced(before)

    def _unlink_replaced(self, before: set[str]) -> None:
        for name in before - self._live_files():
            (self.path / name).unlink(missing_ok=True)   # a reader that opened it keeps it open

    def _live_files(self) -> set[str]:
        return self.row_files.names() | self.vector_indexes.files(self.meta)

    def _require_writer(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"index {self.path} was opened read-only")

    @contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

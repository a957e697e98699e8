"""A reader's snapshot of an index: one read transaction, and the row files and vector index files it names.

Readers never block and never write: a reader holds one read transaction (a WAL snapshot) from open to
close (or until `refresh` moves it to the newest commit), and maps the row files (and opens the derived
indexes' files) named by that snapshot, so rows, paths and vectors always agree. A writer only writes
bytes of the live files past the committed length, which no reader maps (the one exception: a derived
index repairing bytes that failed its check), and unlinks replaced files (a reader's mapping keeps their
content). A writer that replaces a generation between the snapshot's start and the mapping of its
files is met as a missing file: the snapshot is taken again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .catalogue import Catalogue
from .errors import IndexCorruptError, IndexStoreError
from .identity import IndexIdentity
from .rowfiles import RowFiles
from .vector_index import VectorIndexes, VectorSearcher

ATTEMPTS = 5


class Snapshot:
    """What one reader sees: the catalogue's state as of `data_version`, the row files mapped, the vector
    indexes opened. `stale`: the search vectors must be computed again from the features (by the next
    writer); `vectors_problem`: why they cannot be searched meanwhile (None when they can)."""

    def __init__(self, catalogue: Catalogue, row_files: RowFiles, indexes: VectorIndexes, notes: list[str],
                 identity: IndexIdentity | None = None):
        self.catalogue = catalogue
        self.identity = identity     # checked against each snapshot's meta before any file is mapped
        self.row_files = row_files
        self.indexes = indexes
        self.notes = notes       # the store's: what taking the snapshot found, one line each
        self.maps: dict[str, np.ndarray | None] = {}
        self.searchers: dict[str, VectorSearcher | None] = {}
        self.data_version = 0
        self.vectors_problem: IndexCorruptError | None = None
        self.features_problem: IndexCorruptError | None = None   # features cut off: search works, projection not
        self.stale = False
        self.verified = 0                          # leading vector rows checked against their checksums ...
        self.verified_file = ""                    # ... of this vectors file (rows never change in place)
        self.unsound = np.empty(0, np.int64)       # ... and those of them that failed

    def take(self) -> None:
        """One read transaction for the reader's life, and the row files it names, mapped now."""
        last_missing = None
        for attempt in range(ATTEMPTS):
            self.data_version = self.catalogue.begin()
            if self.identity is not None:
                self.stale |= self.identity.needs_reprojection(self.catalogue.folder, self.catalogue.meta)
            stale, notes = self.catalogue.check_rows(self.row_files, writer=False)
            self.stale |= stale
            self.notes.extend(notes)
            self.close_searchers()
            self.vectors_problem = self.features_problem = None
            try:
                self.maps = {"features": self._features()}
                try:
                    self.maps["vectors"] = self.row_files.map("vectors")
                except IndexCorruptError as e:     # short, while the features are whole: vectors can be computed again
                    self._vectors_unusable(e)
                    return
                self.maps["vectors.crc"] = self.row_files.crc_map("vectors")
                self.searchers = self.indexes.searchers(self.catalogue.meta, self.maps["vectors"])
                if self.verified:
                    self.verify()          # a long-lived reader that verified keeps verifying (the new rows)
                return
            except FileNotFoundError as e:
                # a writer replaced the generation between our snapshot and the open: look again, unless
                # the same generation names the same missing file again
                missing = (self.catalogue.meta.get("generation"), e.filename)
                if attempt and missing == last_missing:
                    if Path(e.filename).name == self.catalogue.meta.get("vectors_file") and "features" in self.maps:
                        self._vectors_unusable(self.row_files.short(Path(e.filename), None))
                        return
                    self.catalogue.rollback()
                    raise self.row_files.short(Path(e.filename), None) from None
                self.catalogue.rollback()
                last_missing = missing
        raise IndexStoreError(f"index {self.catalogue.folder} keeps changing under this reader: try again")

    def _features(self) -> np.ndarray | None:
        """The features mapped; a features file short of the committed rows while the vectors are whole leaves
        search working (features_problem says why projecting cannot, and how to repair)."""
        try:
            return self.row_files.map("features")
        except IndexCorruptError:
            if self.row_files.file_rows("vectors") < self.catalogue.rows:
                raise
            self.features_problem = IndexCorruptError(
                f"{self.row_files.path('features')} holds fewer rows than the {self.catalogue.rows} committed: search "
                "works; `uclip check --repair` (or the next `uclip index`) drops only the photos whose image features "
                "it lost, and `uclip index` embeds them again")
            self.notes.append(f"note: {self.features_problem}")
            return None

    def refresh(self) -> bool:
        """Move to the newest committed state; True when anything was committed since (one small query
        when nothing was)."""
        if not self.catalogue.changed_since(self.data_version):
            return False
        self.take()
        return True

    def warm(self) -> None:
        """The vector indexes do their first-search checks now (the int8 copy's spot check), and every row is
        checked against its checksum (a long-lived reader: searches then read only verified rows)."""
        for searcher in self.searchers.values():
            if searcher is not None:
                searcher.warm()
        self.verify()

    def verified_all(self) -> bool:
        return self.maps.get("vectors.crc") is not None and self.verified >= self.catalogue.rows

    def unsound_of(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` whose vector fails its checksum: as found by `verify`, the rest checked now."""
        rows = np.asarray(rows, dtype=np.int64)
        known = rows < self.verified
        if not len(self.unsound) and known.all():      # the served case: every row checked at warm(), all sound
            return np.empty(0, np.int64)
        later = self.row_files.unsound("vectors", rows[~known], data=self.maps.get("vectors"),
                                       crcs=self.maps.get("vectors.crc"))
        return np.union1d(np.intersect1d(rows[known], self.unsound), later).astype(np.int64)

    def verify(self) -> None:
        """Check the vector rows not yet checked against their checksums (all of a new generation's)."""
        vectors, crcs = self.maps.get("vectors"), self.maps.get("vectors.crc")
        if vectors is None or crcs is None:
            return
        if self.verified_file != self.catalogue.meta["vectors_file"] or self.verified > len(vectors):
            self.verified, self.unsound = 0, np.empty(0, np.int64)
        new = self.row_files.unsound("vectors", np.arange(self.verified, len(vectors)), data=vectors, crcs=crcs)
        self.unsound = np.union1d(self.unsound, new).astype(np.int64)
        self.verified, self.verified_file = len(vectors), self.catalogue.meta["vectors_file"]
        for searcher in self.searchers.values():
            if searcher is not None:
                searcher.prove = False      # every row is checked: the faster pass on this CPU may answer

    def close_searchers(self) -> None:
        for searcher in self.searchers.values():
            if searcher is not None:
                searcher.close()
        self.searchers = {}

    def close(self) -> None:
        self.maps = {}
        self.close_searchers()

    def _vectors_unusable(self, problem: IndexCorruptError) -> None:
        """The vectors file is missing or short while the features are whole: the reader can list and look
        up, not search; the next writer computes the vectors again."""
        if self.row_files.file_rows("features") < self.catalogue.rows:
            self.catalogue.rollback()
            raise problem
        self.vectors_problem = problem
        self.stale = True
        self.maps["vectors"] = None

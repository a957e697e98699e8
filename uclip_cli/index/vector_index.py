"""Vector indexes: derived structures that answer top-k queries over the rows of one vectors file.

The catalogue and its row files (catalogue.py, rowfiles.py) are the source of truth. A vector index is derived from the
vectors file alone, so deleting its files costs a rebuild, never a result. The implementations live
beside each other, one module each:

    exact_index.ExactIndex   the exact scan: the float32 rows, plus an int8 copy with per-row error
                             bounds that finds the same exact result reading a quarter of the bytes
    ann_index.AnnIndex       an approximate FAISS index over a prefix of the rows; search re-scores its
                             candidates exactly from the float32 rows

The store drives their lifecycle through this interface (`VectorIndexes`: the kinds it was given,
kinds.py being the registry) and knows nothing else of them; search.py decides which one answers. Every writing method returns the catalogue meta values that make what it
wrote live; the store commits them in the same SQLite transaction as the rows they describe, after the
files are written and fsynced. So an index's files are either covered by committed meta (durable) or
an ignored tail / an orphan (a crash before the commit), which the next writer drops: crash safety is
the store's argument, unchanged. An index must never write over bytes that committed meta covers
(a reader may map them), except to repair bytes that failed `verify` (they were wrong anyway).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .errors import IndexStoreError

if TYPE_CHECKING:
    from ..sessions import SessionFactory


class VectorSearcher(ABC):
    """One index's files as one snapshot names them, mapped or opened: what a search reads."""

    covered: int      # rows 0..covered-1 are answered by this searcher; rows past it are not its business
    exact: bool       # True: search returns the exact result; False: candidates, to be re-scored
    prove = True      # the rows it reads are not all checksum-verified (rowfiles.py): show damage where it can

    def proven_rows(self) -> int:
        """Leading rows whose damage its searches show by themselves (so they need no checksum per search)."""
        return 0

    @abstractmethod
    def search(self, query: np.ndarray, k: int, *, mask: np.ndarray | None = None, min_score: float | None = None,
               info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64, scores float32), best first. `mask` [rows] bool keeps rows where True."""

    def warm(self) -> None:
        """Do now the checks and loading a first search would do (a server, before its first request)."""

    def close(self) -> None:
        """Let go of what `searcher` opened (files are also released when the object goes)."""


class VectorIndex(ABC):
    """A kind of derived index over one index folder, as the catalogue meta `meta` describes it.

    Objects are cheap views made on demand from the meta of a writer or of a reader's snapshot.
    """

    kind: str = ""
    settings: dict[str, tuple[str, ...]] = {}   # meta keys a user may set (IndexStore.set_setting) -> allowed values

    def __init__(self, folder: Path, meta: Mapping[str, str], sessions: SessionFactory | None = None):
        self.folder = Path(folder)
        self.meta = meta
        self.sessions = sessions   # the caller's ONNX Runtime sessions, for a kind that runs a kernel (None: none)

    @classmethod
    def check_setting(cls, key: str, value: str) -> None:
        """Raise a UclipError (one line) when this kind cannot honour `key` = `value` here."""

    @property
    def vectors_file(self) -> str:
        return self.meta["vectors_file"]

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def d(self) -> int:
        return int(self.meta["d_search"])

    @property
    def committed_rows(self) -> int:
        """Leading rows the committed meta says this index covers (`verify` must find them intact)."""
        return 0

    def unbuilt(self) -> str:
        """Why this index covers nothing yet, in words a user reads (`uclip check`), not "0 rows covered"."""
        return "nothing built yet"

    # ---------------------------------------------------------------- files

    @abstractmethod
    def files(self) -> set[str]:
        """Names (in the index folder) of the files the committed meta makes live."""

    @classmethod
    @abstractmethod
    def claims(cls, name: str) -> bool:
        """True for file names this kind writes: the writer's open deletes those that are not live."""

    # ---------------------------------------------------------------- writer

    @abstractmethod
    def add(self, vectors: np.ndarray) -> dict[str, str]:
        """Rows were appended (fsynced, not yet committed): `vectors` maps all of them, committed or not.

        Cover what pays now; return the meta values to commit with the rows ({} when nothing changes).
        """

    def remove(self, rows: np.ndarray) -> dict[str, str]:
        """Rows died (their files left the catalogue). Search filters dead rows through the catalogue's
        mask and compaction rebuilds, so the kinds here have nothing to write; a kind that can drop rows
        cheaply may."""
        return {}

    @abstractmethod
    def rebuild(self, vectors_file: str, vectors: np.ndarray) -> dict[str, str]:
        """A new generation of the vectors (re-projection, compaction): build for it from scratch.

        Writes new files only; the returned meta switches to them with the generation.
        """

    @abstractmethod
    def verify(self, vectors: np.ndarray) -> int:
        """How many leading committed rows this index covers correctly (0 when unusable)."""

    @abstractmethod
    def repair(self, vectors: np.ndarray) -> dict[str, str]:
        """Writer's open: keep what verifies, rebuild or drop the rest; meta values to commit."""

    # ---------------------------------------------------------------- reader

    @abstractmethod
    def searcher(self, vectors: np.ndarray) -> VectorSearcher | None:
        """Open the committed files now (a reader pins its snapshot); None when there is nothing usable."""


class VectorIndexes:
    """The derived vector indexes of one index folder: the kinds the store was given, driven together.

    Each method takes the meta it acts on (a writer's, or a reader's snapshot) and returns the meta values
    to commit (writing methods), so the store commits them with the rows they describe.
    """

    def __init__(self, folder: Path, kinds: Sequence[type[VectorIndex]], sessions: SessionFactory | None = None):
        self.folder = folder
        self.kinds = tuple(kinds)
        self.sessions = sessions

    def views(self, meta: Mapping[str, str]) -> list[VectorIndex]:
        return [kind(self.folder, meta, self.sessions) for kind in self.kinds]

    def view(self, meta: Mapping[str, str], kind: str) -> VectorIndex:
        return next(ix for ix in self.views(meta) if ix.kind == kind)

    def files(self, meta: Mapping[str, str]) -> set[str]:
        return {f for ix in self.views(meta) for f in ix.files()}

    def claims(self, name: str) -> bool:
        return any(kind.claims(name) for kind in self.kinds)

    def settings(self, meta: Mapping[str, str]) -> dict[str, str]:
        """The user's settings among `meta` (they outlive a rebuild)."""
        return {key: meta[key] for kind in self.kinds for key in kind.settings if key in meta}

    def check_setting(self, key: str, value: str) -> None:
        """A UclipError (one line) unless some kind owns setting `key` and can honour `value` here."""
        owner = next((kind for kind in self.kinds if key in kind.settings), None)
        if owner is None or value not in owner.settings[key]:
            choices = f"one of {', '.join(owner.settings[key])}" if owner else "not a setting"
            raise IndexStoreError(f"{key} = {value!r}: {choices}")
        owner.check_setting(key, value)

    def add(self, meta: Mapping[str, str], vectors: np.ndarray) -> dict[str, str]:
        return _merged(ix.add(vectors) for ix in self.views(meta))

    def rebuild(self, meta: Mapping[str, str], vectors_file: str, vectors: np.ndarray) -> dict[str, str]:
        return _merged(ix.rebuild(vectors_file, vectors) for ix in self.views(meta))

    def repair(self, meta: Mapping[str, str], vectors: np.ndarray) -> dict[str, str]:
        return _merged(ix.repair(vectors) for ix in self.views(meta))

    def searchers(self, meta: Mapping[str, str], vectors: np.ndarray) -> dict[str, VectorSearcher | None]:
        return {ix.kind: ix.searcher(vectors) for ix in self.views(meta)}


def _merged(changes) -> dict[str, str]:
    out: dict[str, str] = {}
    for change in changes:
        out.update(change)
    return out

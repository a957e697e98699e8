"""Vector indexes: derived structures that answer top-k queries over the rows of one vectors file.

The catalogue and its row files (store.py) are the source of truth. A vector index is derived from the
vectors file alone, so deleting its files costs a rebuild, never a result. The implementations live
beside each other, one module each:

    exact_index.ExactIndex   the exact scan: the float32 rows, plus an int8 copy with per-row error
                             bounds that finds the same exact result reading a quarter of the bytes
    ann_index.AnnIndex       an approximate FAISS index over a prefix of the rows; search re-scores its
                             candidates exactly from the float32 rows

The store drives their lifecycle through this interface and knows nothing else of them; search.py
decides which one answers. Every writing method returns the catalogue meta values that make what it
wrote live; the store commits them in the same SQLite transaction as the rows they describe, after the
files are written and fsynced. So an index's files are either covered by committed meta (durable) or
an ignored tail / an orphan (a crash before the commit), which the next writer drops: crash safety is
the store's argument, unchanged. An index must never write over bytes that committed meta covers
(a reader may map them), except to repair bytes that failed `verify` (they were wrong anyway).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import numpy as np


class VectorSearcher(ABC):
    """One index's files as one snapshot names them, mapped or opened: what a search reads."""

    covered: int      # rows 0..covered-1 are answered by this searcher; rows past it are not its business
    exact: bool       # True: search returns the exact result; False: candidates, to be re-scored

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

    def __init__(self, folder: Path, meta: Mapping[str, str]):
        self.folder = Path(folder)
        self.meta = meta

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

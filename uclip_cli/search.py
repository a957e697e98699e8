"""Search orchestration: which vector index answers a query, and what the answer may contain.

The store (catalogue + row files) says which rows exist and which are dead; the vector indexes
(vector_index.py) find rows; this module decides between them and makes the answer exact where it
claims to be:

- The exact index (exact_index.py) answers every query by default: its result is the exact top-k of
  every valid row (the contract in exact.py).

The row filter is a bool mask over the committed rows (`IndexStore.search_mask`: dead rows out, and a
folder restriction); it travels to whichever index answers.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .vector_index import VectorSearcher


class SearchSource(Protocol):
    """What search needs of an open index (IndexStore is one)."""

    def vectors(self) -> np.ndarray: ...

    def searcher(self, kind: str) -> VectorSearcher | None: ...


def search(
    source: SearchSource,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    min_score: float | None = None,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for `query`: (rows int64, scores float32), best first, scores true cosines."""
    return source.searcher("exact").search(query, k, mask=mask, min_score=min_score, info=info)

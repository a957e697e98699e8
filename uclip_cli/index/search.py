"""Search orchestration: which vector index answers a query, and what the answer may contain.

The store (catalogue + row files) says which rows exist and which are dead; the vector indexes
(vector_index.py) find rows; this module decides between them:

- The exact index (exact_index.py) answers by default: its result is the exact top-k of every valid
  row (the contract in exact.py), at the cost of reading every row (through the int8 copy).
- The approximate index (ann_index.py) answers when one exists for the live vectors (the index's
  ann_mode setting and size decide that) and the caller did not ask for `exact`. It covers the rows
  it was built over; rows committed since (the tail, at most ann_index.TAIL_ROWS) are searched by the
  exact index, so a new photo is found right after its commit. Its candidates (OVERFETCH times k)
  and the tail's exact top-k are re-scored together canonically from the float32 rows: printed scores
  are true cosines, ranking and ties follow exact.py's contract among the candidates, and a removed
  row never comes back (the mask travels into faiss and the re-scoring alike). What it may miss is a
  true top-k row that none of the probed lists held: recall, measured in bench/README.md.
- A row filter keeping few rows (a small folder: at most EXACT_SELECTED_ROWS) is searched exactly:
  reading those rows costs less than a filtered approximate search that must probe more lists to
  find k of them. A larger filter travels into faiss as a bitmap of allowed rows (filtered search,
  not over-fetch and post-filter: a folder of 1 % of the photos would leave 1 % of the candidates),
  with nprobe raised by the inverse of the kept share (capped) so that about as many allowed rows
  are scanned as without a filter.

The row filter is a bool mask over the committed rows (`Catalogue.search_mask`: dead rows out, and a
folder restriction).

Damaged rows never reach an answer unseen, nor leave it unseen. Every row is a unit vector by construction
(the index's unit_rows) and carries a checksum (rowfiles.py). The exact index leaves out rows whose norm or
int8 bounds show damage (exact.py); the int8 pass proves each candidate's float32 row against its copy's
bounds, so a row it covers cannot drop out of an answer silently either. The rows a search reads that
nothing proves (past the int8 copy, all of a small index, the few rows a folder keeps, an approximate
index's tail) are checked against their checksums before the search, every answer's rows after it; a
long-lived reader (`uclip serve`) checks every row once (Snapshot.warm) and then only new ones. A damaged
row is left out, the search runs again without it, and it is listed in info["damaged"] (the caller tells
the user to run `uclip check --repair`, which computes it again from the frozen features). Cost: CRC-32
of 2 KB rows, about 2 us a row (bench/bench_integrity.py).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .exact import MAX_DAMAGED_RERUNS, QUANT_SPARSE_SHARE, UNIT_TOLERANCE, DamagedRowsError, rank_exactly
from .vector_index import VectorSearcher

OVERFETCH = 20                 # ANN candidates per result row re-scored exactly: 10 left recall@10 at 0.93 at 10M (bench/README.md)
MIN_CANDIDATES = 100
EXACT_SELECTED_ROWS = 50_000   # a filter keeping at most this many rows is searched exactly
MAX_NPROBE_BOOST = 16          # a filtered ANN search probes at most this many times more lists


class SearchSource(Protocol):
    """What search needs of an open index (IndexStore is one)."""

    unit_rows: bool   # every row is a unit vector: a row of another norm is damage

    def vectors(self) -> np.ndarray: ...

    def proven_rows(self) -> int: ...

    def unsound(self, rows: np.ndarray) -> np.ndarray: ...

    def searcher(self, kind: str) -> VectorSearcher | None: ...


def search(
    source: SearchSource,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    min_score: float | None = None,
    info: dict | None = None,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for `query`: (rows int64, scores float32), best first, scores true cosines.

    `info`, when given, receives "index" ("exact" or "ann"), what the answering index reports, and
    "damaged": rows left out because their vectors are damaged.
    """
    info = {} if info is None else info
    unit = source.unit_rows
    ann = _answering_ann(source, query, k, mask, exact)
    mask = _without(source.unsound(_unproven(source, mask, ann)), mask, len(source.vectors()), info)
    for _ in range(MAX_DAMAGED_RERUNS):
        rows, scores = _search(source, query, k, mask=mask, min_score=min_score, info=info, exact=exact)
        bad = sorted({*(_damaged(source.vectors(), rows) if unit else []), *source.unsound(rows).tolist()})
        if not bad:
            return rows, scores
        info["damaged"] = sorted(set(info.get("damaged", [])) | set(bad))
        mask = np.ones(len(source.vectors()), bool) if mask is None else mask.copy()
        mask[info["damaged"]] = False
    raise DamagedRowsError(f"{len(info['damaged'])} damaged rows met in one search")


def _unproven(source: SearchSource, mask: np.ndarray | None, ann: VectorSearcher | None) -> np.ndarray:
    """The rows this search reads that nothing proves: past the int8 copy's proven rows (all of them when a
    folder keeps so few that the float32 pass reads them); with an approximate index, its tail (its own
    candidates are re-scored from the float32 rows, and the answer's rows are checked after)."""
    n = len(source.vectors())
    if mask is not None and np.count_nonzero(mask) < QUANT_SPARSE_SHARE * n:
        return np.flatnonzero(mask)
    first = ann.covered if ann is not None else source.proven_rows()
    rows = np.arange(first, n)
    return rows if mask is None else rows[mask[first:]]


def _without(bad: np.ndarray, mask: np.ndarray | None, n: int, info: dict) -> np.ndarray | None:
    """`mask` with the rows `bad` left out (and listed in info["damaged"])."""
    if bad.size == 0:
        return mask
    info["damaged"] = sorted(set(info.get("damaged", [])) | set(bad.tolist()))
    mask = np.ones(n, bool) if mask is None else mask.copy()
    mask[bad] = False
    return mask


def _damaged(vectors: np.ndarray, rows: np.ndarray) -> list[int]:
    """The rows (of an answer) whose vector is not a unit vector: damaged."""
    if len(rows) == 0:
        return []
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(np.asarray(vectors[rows], dtype=np.float64), axis=1)
    return rows[~(np.abs(norms - 1.0) <= UNIT_TOLERANCE)].tolist()


def _answering_ann(source, query, k, mask, exact) -> VectorSearcher | None:
    """The approximate index when it answers this search (it exists, the caller allows it, the query is a
    direction, and the filter keeps enough rows), else None: the exact index answers."""
    ann = None if exact else source.searcher("ann")
    query = np.asarray(query, dtype=np.float32)
    kept = None if mask is None else int(np.count_nonzero(mask))
    usable = (ann is not None and k > 0 and bool(np.all(np.isfinite(query))) and bool(np.any(query))
              and (kept is None or kept > EXACT_SELECTED_ROWS))
    return ann if usable else None


def _search(source, query, k, *, mask, min_score, info, exact) -> tuple[np.ndarray, np.ndarray]:
    exact_searcher = source.searcher("exact")
    ann = _answering_ann(source, query, k, mask, exact)
    query = np.asarray(query, dtype=np.float32)
    kept = None if mask is None else int(np.count_nonzero(mask))
    if ann is None:
        if info is not None:
            info["index"] = "exact"
        return exact_searcher.search(query, k, mask=mask, min_score=min_score, info=info)
    if info is not None:
        info["index"] = "ann"
    nprobe = ann.nprobe
    if kept is not None:
        share = kept / max(1, len(mask))
        nprobe = int(min(ann.nprobe * MAX_NPROBE_BOOST, np.ceil(ann.nprobe / max(share, 1e-9))))
    try:
        candidates, _ = ann.search(query, max(k * OVERFETCH, MIN_CANDIDATES), mask=mask, info=info, nprobe=nprobe)
    except (RuntimeError, OSError, MemoryError):      # faiss could not read a file that passed the cheap checks
        info["index"] = "exact"
        return exact_searcher.search(query, k, mask=mask, min_score=min_score, info=info)
    tail, _ = exact_searcher.search(query, k, mask=mask, min_score=min_score, start=ann.covered)
    rows = np.union1d(candidates, tail)
    if mask is not None:
        rows = rows[mask[rows]]
    return rank_exactly(source.vectors(), query, k, rows, min_score)

"""Exact top-k by inner product over stored vectors (cosine for L2-normalised vectors)."""
from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK_ROWS = 65536       # rows scored at once: bounds temporary memory to a few CHUNK_ROWS arrays
SPARSE_SHARE = 0.25      # a mask selecting fewer rows than this share scores only those rows


def top_k(
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    min_score: float | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `vectors` [N, d] (a memmap is fine) with the highest `vectors @ query`.

    `mask` [N] bool keeps only rows where it is True; `min_score` drops lower scores. Returns
    (rows int64, scores float32), best first, equal scores by ascending row, so results are
    deterministic. Never a full sort: a chunk contributes only scores above the k-th best so far,
    and those are reduced to k by argpartition.
    """
    query = _check_inputs(vectors, query, k, mask)
    best_rows = np.empty(0, np.int64)
    best_scores = np.empty(0, np.float32)
    if k > 0:
        threshold = -np.inf  # the k-th best score so far; masked, NaN and too-low scores are -inf
        for rows, scores in _scored_blocks(vectors, query, mask, chunk_rows):
            scores[np.isnan(scores)] = -np.inf
            if min_score is not None:
                scores[scores < min_score] = -np.inf
            # Blocks come in ascending row order, so a score equal to the current k-th best loses its tie.
            candidates = np.flatnonzero(scores > threshold)
            if candidates.size == 0:
                continue
            best_rows = np.concatenate([best_rows, rows[candidates]])
            best_scores = np.concatenate([best_scores, scores[candidates]])
            keep = _best_positions(best_scores, best_rows, k)
            best_rows, best_scores = best_rows[keep], best_scores[keep]
            if len(best_scores) == k:
                threshold = max(threshold, best_scores.min())
    order = np.lexsort((best_rows, -best_scores))
    return best_rows[order], best_scores[order]


def _check_inputs(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D [N, d], got shape {vectors.shape}")
    query = np.asarray(query, dtype=vectors.dtype if vectors.dtype.kind == "f" else np.float32)
    if query.shape != (vectors.shape[1],):
        raise ValueError(f"query has shape {query.shape}, the vectors are {vectors.shape[1]}-d")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if mask is not None and (mask.dtype != bool or mask.shape != (vectors.shape[0],)):
        raise ValueError(f"mask must be bool [{vectors.shape[0]}], got {mask.dtype} {mask.shape}")
    return query


def _scored_blocks(
    vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, chunk_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids, float32 scores) per block; a sparse mask scores only the rows it selects."""
    n = vectors.shape[0]
    if mask is not None and np.count_nonzero(mask) < SPARSE_SHARE * n:
        selected = np.flatnonzero(mask)
        for start in range(0, len(selected), chunk_rows):
            rows = selected[start:start + chunk_rows]
            yield rows, np.asarray(vectors[rows] @ query, dtype=np.float32)
        return
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        scores = np.asarray(vectors[start:stop] @ query, dtype=np.float32)
        if mask is not None:
            scores[~mask[start:stop]] = -np.inf
        yield np.arange(start, stop, dtype=np.int64), scores


def _best_positions(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores; among scores equal to the k-th, the lowest rows."""
    if len(scores) <= k:
        return np.arange(len(scores))
    threshold = scores[np.argpartition(scores, len(scores) - k)[len(scores) - k]]
    above = np.flatnonzero(scores > threshold)
    ties = np.flatnonzero(scores == threshold)
    ties = ties[np.argsort(rows[ties], kind="stable")][: k - len(above)]
    return np.concatenate([above, ties])

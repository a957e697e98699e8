"""Pairs of rows whose cosine reaches a threshold: the search under `uclip dupes` (dupes.py).

Two ways, one answer (row arrays i < j), both exact for every pair they report:

- `exact_pairs` compares every pair: blocks of rows @ the later rows' transposed features (float32 BLAS,
  each pair once). It finds every pair, at a cost of n^2 d / 2 multiply-adds: 2.6e12 at 100,000 photos of
  512-d, ~45 s on 2 vCPUs (bench/bench_dupes.py). `choose` takes it for up to EXACT_ROWS rows, where it
  answers in a second or two anyway, and `uclip dupes --exact` asks for it at any size.
- `probed_pairs` compares only rows that share or neighbour a coarse cell: an inverted file (FAISS's
  IndexIVFFlat idea, here in numpy). Spherical k-means on a sample puts ~sqrt(n) centroids; each row's
  *home* is its nearest centroid's cell, and each row probes its PROBES nearest cells; a pair (i, j) is
  compared when j's home is among i's probed cells or i's home among j's. Near copies (cosine >= 0.9: a
  distance of 0.45 between unit rows, against ~1.0 between unrelated photos) almost always share a home
  or have each other's among their nearest few cells; a pair whose rows fall in cells far apart is missed
  (recall against `exact_pairs`, and the planted clusters found at 100,000 rows, are measured in
  bench_dupes.py). It never reports a pair below the threshold. Work: the k-means (a sample of
  SAMPLE_PER_CELL rows per cell, KMEANS_ITERATIONS rounds) plus sum over cells of |probing rows| x |home
  rows| products, ~ n * PROBES * n / cells * d: ~30x fewer products than every pair at 100,000 rows (the
  cells are uneven) and ~1/15 of its CPU time all told (bench/README.md). A cell that
  holds many rows (thousands of copies of one screenshot) costs more, never more memory: its products run
  in the same bounded blocks as the exact way.

Not FAISS range search (the `ann` extra): that extra is optional, so the numpy path has to exist and be
tested anyway, and it meets the target on its own; one path, one set of tests. Not int8 products
(index/int8_kernel.py) as a prefilter over every pair: measured 2x per block but 1.2x end to end, and still
n^2 (bench/README.md) — the pairs compared have to become fewer, not cheaper.

Exact for what they report: the float32 products only select candidates, at threshold - bound, where bound
= gamma(d) |x| |y| is the forward-error bound of a d-term float32 dot product in any summation order
(Higham, Lemma 3.1); each candidate is then checked in float64 from the same float32 features. So a pair
is reported exactly when its float64 cosine of the stored features is >= threshold, whichever BLAS ran.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

EXACT_ROWS = 20_000        # up to this many rows, every pair (~2 s on 2 vCPUs at 512-d, bench/README.md)
PROBES = 4                 # cells each row looks into: its home and the 3 nearest others
CELLS_PER_SQRT = 1         # cells = CELLS_PER_SQRT * sqrt(rows)
SAMPLE_PER_CELL = 32       # k-means trains on this many rows per cell (at most all of them)
KMEANS_ITERATIONS = 6
BLOCK_ROWS = 1024
BLOCK_COLS = 16384
U32 = 2.0 ** -24           # float32's unit roundoff

Progress = Callable[[str, int, int], None]      # (stage, done, total)


def choose(rows: int, exact: bool | None = None) -> str:
    """"exact" or "probed": `exact` when given, else exact up to EXACT_ROWS rows."""
    if exact is not None:
        return "exact" if exact else "probed"
    return "exact" if rows <= EXACT_ROWS else "probed"


def find_pairs(x: np.ndarray, threshold: float, *, exact: bool | None = None,
               progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) at cosine >= threshold, by the way `choose` picks."""
    if choose(len(x), exact) == "exact":
        return exact_pairs(x, threshold, progress=progress)
    return probed_pairs(x, threshold, progress=progress)


def rounding_slack(x: np.ndarray) -> float:
    """How far below the true value a float32 product of two rows of `x` can fall: gamma(d) max|row|^2."""
    d = x.shape[1]
    gamma = d * U32 / (1 - d * U32)
    top = float(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64))) if len(x) else 0.0
    return gamma * top


def verified(x: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs whose float64 cosine (of the float32 rows as stored) is >= threshold."""
    keep = np.zeros(len(i), bool)
    for start in range(0, len(i), 65536):
        a, b = i[start:start + 65536], j[start:start + 65536]
        keep[start:start + len(a)] = np.einsum("ij,ij->i", x[a].astype(np.float64), x[b].astype(np.float64)) >= threshold
    return i[keep], j[keep]


def exact_pairs(features: np.ndarray, threshold: float, *, block_rows: int = BLOCK_ROWS,
                block_cols: int = BLOCK_COLS, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j), i < j, of rows of `features` whose cosine is >= threshold: blocked, exact.

    Each block's products go into one reused buffer (no fresh pages per block), the diagonal (a photo with
    itself) is cleared, and only the block rows with a hit are searched for their columns: most rows have
    none, so the scan costs one comparison and one any() per product."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    bound = threshold - rounding_slack(x)
    buffers = _Buffers(block_rows * block_cols)
    found_i, found_j = [], []
    starts = range(0, n, block_rows)
    for step, start in enumerate(starts):
        rows = x[start:start + block_rows]
        for col in range(start, n, block_cols):
            i, j = buffers.hits(rows, x[col:col + block_cols], bound, diagonal=col == start)
            i, j = i + start, j + col
            keep = j > i
            found_i.append(i[keep])
            found_j.append(j[keep])
        if progress:
            progress("comparing every pair", step + 1, len(starts))
    return verified(x, *_joined(found_i, found_j), threshold)


def probed_pairs(features: np.ndarray, threshold: float, *, probes: int = PROBES, cells: int | None = None,
                 seed: int = 0, block_rows: int = BLOCK_ROWS, block_cols: int = BLOCK_COLS,
                 progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) at cosine >= threshold among rows that share or neighbour a k-means cell (module
    docstring): each reported pair verified exactly; recall below 1 only for pairs in cells far apart."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    cells = cells or max(1, min(n, round(CELLS_PER_SQRT * math.sqrt(n))))
    probes = max(1, min(probes, cells))
    centroids = spherical_kmeans(x, cells, seed=seed, progress=progress)
    nearest = nearest_cells(x, centroids, probes, progress=progress)       # [n, probes], home first
    home = nearest[:, 0]
    order = np.argsort(home, kind="stable")                   # rows by home cell: each cell one slice
    bounds = np.searchsorted(home[order], np.arange(cells + 1))
    by_home = x[order]
    probing = np.argsort(nearest.ravel(), kind="stable")      # (row, probe) entries by cell
    probe_bounds = np.searchsorted(nearest.ravel()[probing], np.arange(cells + 1))
    probing_rows = probing // probes
    bound = threshold - rounding_slack(x)
    buffers = _Buffers(block_rows * block_cols)
    found_i, found_j = [], []
    for c in range(cells):
        homed = order[bounds[c]:bounds[c + 1]]
        asking = probing_rows[probe_bounds[c]:probe_bounds[c + 1]]
        if len(homed) and len(asking):
            targets = by_home[bounds[c]:bounds[c + 1]]
            for a in range(0, len(asking), block_rows):
                queries = asking[a:a + block_rows]
                for b in range(0, len(homed), block_cols):
                    qi, tj = buffers.hits(x[queries], targets[b:b + block_cols], bound)
                    i, j = queries[qi], homed[b + tj]
                    found_i.append(np.minimum(i, j)[i != j])
                    found_j.append(np.maximum(i, j)[i != j])
        if progress and (c % 16 == 15 or c == cells - 1):
            progress("comparing nearby photos", c + 1, cells)
    i, j = _joined(found_i, found_j)
    unique = np.unique(i * n + j)                       # a pair found from both sides, or by two probes
    return verified(x, unique // n, unique % n, threshold)


def spherical_kmeans(x: np.ndarray, cells: int, *, seed: int = 0, iterations: int = KMEANS_ITERATIONS,
                     progress: Progress | None = None) -> np.ndarray:
    """`cells` unit centroids [cells, d] of a sample of rows (k-means on the sphere: cosine assignment, mean
    renormalised); an empty cell is re-seeded with a random sample row. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), cells * SAMPLE_PER_CELL), replace=False))]
    centroids = sample[rng.choice(len(sample), size=cells, replace=False)].copy()
    for step in range(iterations):
        assigned = nearest_cells(sample, centroids, 1)[:, 0]
        counts = np.bincount(assigned, minlength=cells)
        order = np.argsort(assigned, kind="stable")       # each cell's rows together: one reduceat
        held = counts > 0                                 # (np.add.at: 6x slower; cumsum over axis 0: 5x)
        sums = np.zeros_like(centroids)
        sums[held] = np.add.reduceat(sample[order], (np.cumsum(counts) - counts)[held], axis=0)
        empty = counts == 0
        sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = sums / np.where(norms > 0, norms, 1)
        if progress:
            progress("placing cells", step + 1, iterations)
    return centroids.astype(np.float32)


def nearest_cells(x: np.ndarray, centroids: np.ndarray, probes: int, *, block: int = 8192,
                  progress: Progress | None = None) -> np.ndarray:
    """For each row, its `probes` nearest centroids by cosine [n, probes], nearest first."""
    out = np.empty((len(x), probes), np.int64)
    for start in range(0, len(x), block):
        sims = x[start:start + block] @ centroids.T
        if probes == 1:
            out[start:start + len(sims), 0] = sims.argmax(axis=1)
        else:
            top = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
            ranked = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
            out[start:start + len(sims)] = np.take_along_axis(top, ranked, axis=1)
        if progress:
            progress("finding each photo's cells", min(start + block, len(x)), len(x))
    return out


class _Buffers:
    """One products buffer and one hits buffer, reused by every block (no fresh pages per block)."""

    def __init__(self, size: int):
        self.products = np.empty(size, np.float32)
        self.hit = np.empty(size, bool)

    def hits(self, rows: np.ndarray, cols: np.ndarray, bound: float, *, diagonal: bool = False):
        """(i, j) local indices where rows @ cols.T >= bound; `diagonal`: a block of rows with themselves."""
        shape = (len(rows), len(cols))
        sims = self.products[:shape[0] * shape[1]].reshape(shape)
        np.matmul(rows, cols.T, out=sims)
        if diagonal:
            d = np.arange(min(shape))
            sims[d, d] = -2.0
        hit = self.hit[:shape[0] * shape[1]].reshape(shape)
        np.greater_equal(sims, bound, out=hit)
        some = np.flatnonzero(hit.any(axis=1))
        if not some.size:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        i, j = np.nonzero(hit[some])
        return some[i].astype(np.int64), j.astype(np.int64)


def _joined(found_i: list, found_j: list) -> tuple[np.ndarray, np.ndarray]:
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)

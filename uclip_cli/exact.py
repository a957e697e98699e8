"""Exact top-k by inner product over stored vectors (cosine for L2-normalised vectors).

What "exact" means
------------------
The score of row i is its *canonical score*: the products v_ij * q_j formed in float64 (exact for float32
inputs), summed in float64 by a fixed pairwise tree, rounded once to float32 (`exact_scores`). Every
operation is an elementwise IEEE operation on that row alone, so the score of a row does not depend on
which other rows are scored with it, on chunk boundaries, masks or threads. A BLAS matrix-vector product
does not have that property: its last bit changes with the number of rows and their alignment.
The result of a search is the k valid rows (mask True, canonical score >= min_score, not NaN) with the
highest canonical scores, equal scores by ascending row, best first. Both search paths return exactly it.

How it is found fast: bound, then re-score
------------------------------------------
A fast pass gives every row an approximate score with a proven bound: low_i <= C_i <= high_i, C_i the
canonical score. Then, with T the k-th highest canonical score among valid rows and L the k-th highest
low_i over any set of valid rows (L = -inf with fewer than k of them):

1. L <= T: the k rows that give L have C >= low >= L, so at least k valid rows score >= L.
2. A row of the result has C_i >= T (a result row is among the k best valid rows; min_score only drops
   rows from the end of that ranking), hence high_i >= C_i >= T >= L.
3. So the candidates {valid i : high_i >= L, high_i >= min_score} contain the whole result. Re-scoring
   the candidates canonically and ranking them by (score desc, row asc) gives the result itself: every
   result row is there, and every other candidate ranks below all of them in the same total order.

Two fast passes provide (low, high):
- float32 (`top_k`): g_i = BLAS float32 product. For any summation order, with or without FMA,
  |g_i - v_i.q| <= gamma_d * sum_j |v_ij q_j| <= gamma_d ||v_i|| ||q||, gamma_d = d*u/(1-d*u), u = 2^-24, and
  |C_i - v_i.q| <= 2u ||v_i|| ||q||. The bound used, 2(d+4)u ||v_i|| ||q|| (norms computed per block, then
  widened), covers both with room for the rounding of the bound itself.
- int8 (`top_k_quantized`): an int8 copy of the rows (`quantize_rows`: per-row scale s_i = max|v_i|/127,
  codes c_i = round(v_i/s_i), v^_i = s_i c_i, e_i >= ||v_i - v^_i||, n_i >= max(||v_i||, ||v^_i||), all
  computed in float64 and rounded up). The query is quantised per search the same way (scale s_q, codes
  h with |h| <= QUERY_HALF_RANGE, q^ = s_q h, dq = q - q^ computed exactly). c_i.h is an exact integer
  product (onnxruntime's integer GEMV, checked on saturating input before first use). Then
      |v_i.q - v^_i.q^| = |(v_i - v^_i).q + v^_i.(q - q^)| <= e_i ||q|| + n_i ||dq||     (Cauchy-Schwarz)
  and the float32/float64 roundings of A_i = s_q s_i (c_i.h) and of C_i add less than
  2^-20 n_i (||q|| + ||q^||), which the bound tol_i includes. low/high = A_i -/+ tol_i.
  The 1M-row pass works with E = max_i tol_i first: it keeps rows with A_i >= A_(k) - 2E, where A_(k) is
  a lower bound of the k-th highest A (the k-th highest of the maxima of groups of rows). A dropped row
  has high_i <= A_i + E < A_(k) - E <= low of each of the k rows with the highest A, all kept, so it is
  never a candidate. Rows past the int8 copy are scored by the float32 pass; both feed one L.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .int8_kernel import CODE_RANGE, Int8Kernel, int8_kernel


CHUNK_ROWS = 65536       # rows scored at once by the float32 pass: bounds temporary memory
SPARSE_SHARE = 0.25      # a mask selecting fewer rows than this share scores only those rows (float32)
QUANT_SPARSE_SHARE = 1 / 16  # below this share of selected rows the int8 pass does not pay: float32 on those rows
QUANT_BLOCK = 8192       # rows per block of an int8 copy (codes stored transposed per block)
QUANT_MIN_ROWS = 32768   # fewer quantised rows than this: the float32 pass is as fast
RESCORE_ROWS = 4096      # rows re-scored canonically at once
GROUP_ROWS = 64          # rows per group whose maxima give a cheap lower bound of the k-th best approximation
STATS = ("scale", "colsum", "err", "norm")   # per-row float32 arrays stored with each block of codes
_U = 2.0 ** -24          # float32 unit roundoff
_SLACK = 2.0 ** -20      # relative room for float rounding of approximations, canonical scores and bounds


# ---------------------------------------------------------------------------- canonical scores


def exact_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Canonical float32 scores of `rows` (int) of `vectors` [N, d] against `query` [d]."""
    rows = np.asarray(rows, dtype=np.int64)
    q = np.asarray(query, dtype=np.float64)
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), RESCORE_ROWS):
        part = rows[start:start + RESCORE_ROWS]
        with np.errstate(invalid="ignore", over="ignore"):   # rows that are not finite score NaN or inf
            products = np.asarray(vectors[part], dtype=np.float64) * q
            out[start:start + len(part)] = _tree_sum(products)
    return out


def _tree_sum(products: np.ndarray) -> np.ndarray:
    """Row sums by a fixed pairwise tree of elementwise float64 additions (same bits whatever the rows)."""
    width = products.shape[1]
    if width == 0:
        return np.zeros(len(products))
    while width > 1:
        if width % 2:
            products[:, 0] += products[:, width - 1]
            width -= 1
        half = width // 2
        products[:, :half] += products[:, half:width]
        width = half
    return products[:, 0]


# ---------------------------------------------------------------------------- candidates


class _Candidates:
    """Rows whose [low, high] score bounds may still reach the result; L = k-th highest low so far."""

    def __init__(self, k: int, min_score: float | None):
        self.k = k
        self.min_score = -np.inf if min_score is None else float(min_score)
        self.best_lows = np.empty(0)
        self.floor = -np.inf
        self._rows: list[np.ndarray] = [np.empty(0, np.int64)]
        self._highs: list[np.ndarray] = [np.empty(0)]
        self._kept = 0

    def add(self, rows: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
        low = np.where(np.isnan(low), -np.inf, low)      # a NaN bound proves nothing: widest bounds
        high = np.where(np.isnan(high), np.inf, high)
        lows = np.concatenate([self.best_lows, low])
        if len(lows) > self.k:
            lows = np.partition(lows, len(lows) - self.k)[len(lows) - self.k:]
        self.best_lows = lows
        if len(lows) == self.k:
            self.floor = max(self.floor, float(lows.min()))
        keep = high >= max(self.floor, self.min_score)
        self._rows.append(rows[keep])
        self._highs.append(high[keep])
        self._kept += int(np.count_nonzero(keep))
        if self._kept > 4 * self.k + 65536:
            self._prune()

    def _prune(self) -> None:
        rows, highs = np.concatenate(self._rows), np.concatenate(self._highs)
        keep = highs >= self.floor
        self._rows, self._highs, self._kept = [rows[keep]], [highs[keep]], int(np.count_nonzero(keep))

    def rows(self) -> np.ndarray:
        self._prune()
        return np.sort(self._rows[0])


def rank_exactly(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray,
                 min_score: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate rows canonically; the k best, best first, equal scores by ascending row."""
    scores = exact_scores(vectors, rows, query)
    keep = ~np.isnan(scores)
    if min_score is not None:
        keep &= scores >= min_score
    rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.float32)


# ---------------------------------------------------------------------------- float32 pass


def top_k(
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    min_score: float | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `vectors` [N, d] (a memmap is fine) with the highest canonical score against `query`.

    `mask` [N] bool keeps only rows where it is True; `min_score` drops lower scores. Returns
    (rows int64, scores float32), best first, equal scores by ascending row (see the module docstring for
    the exact contract). A float32 BLAS pass bounds every score; only rows whose bound reaches the k-th
    best are re-scored. Never a full sort.
    """
    query = _check_inputs(vectors, query, k, mask)
    if k == 0 or len(vectors) == 0:
        return _empty()
    candidates = _Candidates(k, min_score)
    for rows, low, high in _float32_bounds(vectors, query, mask, chunk_rows):
        candidates.add(rows, low, high)
    return rank_exactly(vectors, query, k, candidates.rows(), min_score)


def _check_inputs(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D [N, d], got shape {vectors.shape}")
    query = np.asarray(query)
    query = query.astype(np.float32 if query.dtype.kind != "f" else query.dtype, copy=False)
    if query.shape != (vectors.shape[1],):
        raise ValueError(f"query has shape {query.shape}, the vectors are {vectors.shape[1]}-d")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if mask is not None and (mask.dtype != bool or mask.shape != (vectors.shape[0],)):
        raise ValueError(f"mask must be bool [{vectors.shape[0]}], got {mask.dtype} {mask.shape}")
    return query


def _float32_bounds(
    vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, chunk_rows: int, first_row: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row ids, low, high) per block of valid rows: bounds of their canonical scores from a float32 product."""
    q32 = np.asarray(query, dtype=np.float32)
    d = vectors.shape[1]
    factor = 2 * (d + 4) * _U * float(np.linalg.norm(query.astype(np.float64))) * (1 + _SLACK)
    for rows, block, keep in _float32_blocks(vectors, mask, chunk_rows):
        block = np.asarray(block, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):   # rows that are not finite get NaN bounds: kept
            scores = block @ q32
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            if keep is not None:
                rows, scores, norms = rows[keep], scores[keep], norms[keep]
            tol = norms.astype(np.float64) * factor + _underflow(d)
            low, high = scores - tol, scores + tol
        yield rows + first_row, low, high


def _underflow(d: int, scale: float = 1.0) -> float:
    """Room for absolute (subnormal) rounding errors, which relative bounds do not cover."""
    return d * 2.0 ** -140 * (1.0 + scale)


def _float32_blocks(
    vectors: np.ndarray, mask: np.ndarray | None, chunk_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(row ids, rows, which of them are valid or None for all); a sparse mask reads only the rows it selects."""
    n = vectors.shape[0]
    if mask is not None and np.count_nonzero(mask) < SPARSE_SHARE * n:
        selected = np.flatnonzero(mask)
        for start in range(0, len(selected), chunk_rows):
            rows = selected[start:start + chunk_rows]
            yield rows, vectors[rows], None
        return
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        yield np.arange(start, stop, dtype=np.int64), vectors[start:stop], None if mask is None else mask[start:stop]


# ---------------------------------------------------------------------------- int8 copy


@dataclass
class QuantizedRows:
    """An int8 copy of rows 0..rows-1 of a vectors array, in blocks of `block` rows.

    codes [blocks, d, block] int8: codes[b, j, r] is dimension j of row b*block + r (each block is stored
    transposed, the layout onnxruntime's integer GEMV reads). stats [blocks, 4, block] float32: per row the
    scale s, the sum of its codes, e >= ||v - s*c|| and n >= max(||v||, ||s*c||) (STATS order).
    """

    codes: np.ndarray
    stats: np.ndarray
    _derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.codes.ndim != 3 or self.stats.shape != (self.codes.shape[0], len(STATS), self.codes.shape[2]):
            raise ValueError(f"int8 copy shapes do not match: codes {self.codes.shape}, stats {self.stats.shape}")

    @property
    def block(self) -> int:
        return self.codes.shape[2]

    @property
    def rows(self) -> int:
        return self.codes.shape[0] * self.codes.shape[2]

    def stat(self, name: str) -> np.ndarray:
        """One per-row statistic as a [blocks, block] view."""
        return self.stats[:, STATS.index(name), :]

    def offsets(self, shift: int) -> np.ndarray:
        """shift * (sum of codes) per row, int32 [blocks, block]: what a query shifted by `shift` adds."""
        key = ("offsets", shift)
        if key not in self._derived:
            self._derived[key] = self.stat("colsum").astype(np.int32) * np.int32(shift)
        return self._derived[key]

    def max_bounds(self) -> tuple[float, float]:
        """(max e, max n) over all rows."""
        if "max" not in self._derived:
            self._derived["max"] = (float(self.stat("err").max(initial=0.0)), float(self.stat("norm").max(initial=0.0)))
        return self._derived["max"]


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [m, d] int8, stats [4, m] float32) of float32 rows [m, d]; deterministic, see QuantizedRows."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    scale = (np.abs(v).max(axis=1, initial=0.0) / CODE_RANGE).astype(np.float32)
    scale[~(scale > 0)] = 1.0                          # a zero row: codes 0, its error is its norm
    codes = np.clip(np.rint(v / scale[:, None]), -CODE_RANGE, CODE_RANGE).astype(np.int8)
    approx = codes * scale.astype(np.float64)[:, None]
    err = np.linalg.norm(v - approx, axis=1)
    norm = np.maximum(np.linalg.norm(v, axis=1), np.linalg.norm(approx, axis=1))
    stats = np.stack([scale, codes.sum(axis=1, dtype=np.int64).astype(np.float32), _round_up(err), _round_up(norm)])
    return codes, stats


def quantize_block(vectors: np.ndarray) -> tuple[bytes, bytes]:
    """The bytes one block adds to an int8 copy: (codes transposed [d, m], stats [4, m])."""
    codes, stats = quantize_rows(vectors)
    return np.ascontiguousarray(codes.T).tobytes(), stats.astype("<f4").tobytes()


def _round_up(x: np.ndarray) -> np.ndarray:
    """float32 values >= x (float64): a bound stays a bound after storage."""
    return (x * (1 + _SLACK) + 2.0 ** -126).astype(np.float32)


def verify_quantized(quantized: QuantizedRows, vectors: np.ndarray) -> int:
    """How many leading blocks of `quantized` agree with `vectors` at their first and last rows.

    A spot check against a copy built from other vectors, a zero-filled or truncated-then-extended file,
    plus finite statistics and positive scales in every row: a block that fails, and every block after it,
    is not used (those rows are scanned in float32).
    """
    block = quantized.block
    sane = np.isfinite(quantized.stats).all(axis=(1, 2)) & (quantized.stat("scale") > 0).all(axis=1)
    for b in range(quantized.codes.shape[0]):
        if not sane[b]:
            return b
        picks = np.array([b * block, b * block + block - 1])
        codes, stats = quantize_rows(np.asarray(vectors[picks]))
        stored_codes = quantized.codes[b][:, [0, block - 1]].T
        stored_stats = quantized.stats[b][:, [0, block - 1]]
        if not (np.array_equal(codes, stored_codes) and np.array_equal(stats, stored_stats)):
            return b
    return quantized.codes.shape[0]


def top_k_quantized(
    vectors: np.ndarray,
    quantized: QuantizedRows | None,
    query: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    min_score: float | None = None,
    chunk_rows: int = CHUNK_ROWS,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` with the same result, scoring rows < quantized.rows through their int8 copy.

    Falls back to `top_k` where the int8 pass would not pay or cannot run (few rows, a sparse mask, a
    query that is zero or not finite, onnxruntime missing or inexact on this CPU). `info`, when given,
    receives "path" ("int8" or "float32") and "candidates" (rows re-scored).
    """
    query = _check_inputs(vectors, query, k, mask)
    n = len(vectors)
    covered = 0 if quantized is None else quantized.rows
    if covered > n:
        raise ValueError(f"the int8 copy covers {covered} rows, the vectors have only {n}")
    kernel = int8_kernel(vectors.shape[1]) if covered and covered >= QUANT_MIN_ROWS else None
    usable = (
        kernel is not None and k > 0 and np.all(np.isfinite(query)) and np.any(query)
        and (mask is None or np.count_nonzero(mask) >= QUANT_SPARSE_SHARE * n)
    )
    if not usable:
        if info is not None:
            info.update(path="float32")
        return top_k(vectors, query, k, mask=mask, min_score=min_score, chunk_rows=chunk_rows)
    candidates = _Candidates(k, min_score)
    candidates.add(*_int8_bounds(quantized, kernel, query, k, None if mask is None else mask[:covered], min_score))
    tail_mask = None if mask is None else mask[covered:]
    for rows, low, high in _float32_bounds(vectors[covered:], query, tail_mask, chunk_rows, first_row=covered):
        candidates.add(rows, low, high)
    rows = candidates.rows()
    if info is not None:
        info.update(path="int8", candidates=len(rows))
    return rank_exactly(vectors, query, k, rows, min_score)


def _int8_bounds(
    quantized: QuantizedRows, kernel: Int8Kernel, query: np.ndarray, k: int,
    mask: np.ndarray | None, min_score: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, low, high) of the quantised rows that can still matter (see the module docstring)."""
    q = query.astype(np.float64)
    half = kernel.half_range
    q_scale = float(np.abs(q).max()) / half
    h = np.clip(np.rint(q / q_scale), -half, half)
    q_hat = h * q_scale
    q_norm, dq_norm, q_hat_norm = (float(np.linalg.norm(x)) for x in (q, q - q_hat, q_hat))
    max_err, max_norm = quantized.max_bounds()
    per_norm = dq_norm + _SLACK * (q_norm + q_hat_norm)
    tiny = _underflow(len(q), q_scale)
    widest = (max_err * q_norm + max_norm * per_norm) * (1 + _SLACK) + tiny

    dots = kernel.dots(quantized.codes, (h + half).astype(np.uint8))      # c_i.(h + half), exact int32
    dots -= quantized.offsets(half)                                       # c_i.h
    approx = dots.astype(np.float32)
    approx *= quantized.stat("scale")                                      # A_i / s_q
    approx = approx.reshape(-1)
    if mask is not None:
        approx[~mask] = -np.inf
    floor = float(_kth_group_max(approx, k)) * q_scale                    # <= k-th highest A_i
    cut = _threshold_below(floor - 2 * widest, abs(floor) + 2 * widest, q_scale)
    if min_score is not None:
        cut = max(cut, _threshold_below(min_score - widest, abs(min_score) + widest, q_scale))
    rows = np.flatnonzero(approx >= cut)
    if mask is not None:
        rows = rows[mask[rows]]
    a = approx[rows].astype(np.float64) * q_scale
    at = np.divmod(rows, quantized.block)                                 # the stats are [blocks, block] views
    err = quantized.stat("err")[at].astype(np.float64)
    norm = quantized.stat("norm")[at].astype(np.float64)
    tol = (err * q_norm + norm * per_norm) * (1 + _SLACK) + tiny
    return rows, a - tol, a + tol


def _threshold_below(value: float, magnitude: float, q_scale: float) -> np.float32:
    """A float32 threshold in units of q_scale at or below value / q_scale, whatever the float64 rounding
    of `value` (operands of size `magnitude`) and of the division."""
    if not np.isfinite(value):
        return np.float32(value)
    return np.nextafter(np.float32((value - 2.0 ** -40 * magnitude) / q_scale), np.float32(-np.inf))


def _kth_group_max(values: np.ndarray, k: int) -> float:
    """A lower bound of the k-th highest of `values`: the k-th highest of the maxima of groups of rows."""
    usable = len(values) - len(values) % GROUP_ROWS
    maxima = values[:usable].reshape(-1, GROUP_ROWS).max(axis=1)
    if usable < len(values):
        maxima = np.append(maxima, values[usable:].max())
    if len(maxima) < k:
        return -np.inf
    return float(np.partition(maxima, len(maxima) - k)[len(maxima) - k])

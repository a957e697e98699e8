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
4. Not every candidate need be re-scored: taken by descending high_i, once the rows re-scored hold k valid
   ones, their k-th score T' <= T (they are a subset), and a candidate with high_i < T' has C_i < T: it is
   not in the result, nor is any after it (`rank_exactly`). A row tied with T' has high_i >= T': it is
   re-scored, so ties still go to the lower row.
5. Any proven bounds of the same canonical score may be intersected, and the candidates taken again from
   the intersections: the int8 pass's candidates are bounded a second time by their float32 products
   (`_tightened`), leaving about k rows to re-score instead of hundreds.

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

from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import UclipError
from .int8_copy import BOUND_SLACK, STATS, QuantizedRows, quantize_blocks
from .int8_kernel import CALIBRATION_REPEATS, CALIBRATION_ROWS, CODE_RANGE, QUANT_BLOCK, Int8Kernel, int8_kernel, \
    preferred_path

if TYPE_CHECKING:
    from ..sessions import SessionFactory


CHUNK_ROWS = 65536       # rows scored at once by the float32 pass: bounds temporary memory
SPARSE_SHARE = 0.25      # a mask selecting fewer rows than this share scores only those rows (float32)
QUANT_SPARSE_SHARE = 1 / 16  # below this share of selected rows the int8 pass does not pay: float32 on those rows
QUANT_MIN_ROWS = 8192     # fewer quantised rows than this: the float32 pass is as fast (blocks of 64: measured below)
CALIBRATE_FROM_ROWS = 8192   # from this many quantised rows the faster pass on this CPU is measured (once)
# Both were 32,768 while copies came in blocks of 8,192 rows. With blocks of 64 the int8 pass answered 32,000
# rows in 12-31 ms against 25-70 ms for the float32 pass, and 8,192 rows in 6 ms against 18 ms (bench_search.py
# --k 51, Xeon with AMX, load 7-9: bench/README.md, issue 22); served, 32,000 rows took the float32 pass and
# searched slower (41 ms) than 100,000 rows did through the int8 pass (26 ms).
TIGHTEN_ROWS = 256       # candidates bounded again by their float32 products (_tightened)
RESCORE_ROWS = 256       # rows re-scored canonically at once (1 MB of float64 products: stays in L2; 4096 was 2.4x slower)
GROUP_ROWS = 64          # rows per group whose maxima give a cheap lower bound of the k-th best approximation
_U = 2.0 ** -24          # float32 unit roundoff
MAX_DAMAGED_RERUNS = 16  # searches again without rows found damaged, at most this often
UNIT_TOLERANCE = 1e-3    # |norm - 1| of a unit row beyond this is damage (normalising in float32 errs by < d * 2^-24)


class DamagedRowsError(UclipError):
    """More rows were found damaged during one search than it re-runs for."""

    def __init__(self, what: str):
        super().__init__(f"{what}: the index is badly damaged; run `uclip check --repair`, or `uclip index --rebuild`")


# ---------------------------------------------------------------------------- canonical scores


def exact_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Canonical float32 scores of `rows` (int) of `vectors` [N, d] against `query` [d]."""
    rows = np.asarray(rows, dtype=np.int64)
    q = np.asarray(query, dtype=np.float64)
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), RESCORE_ROWS):
        part = rows[start:start + RESCORE_ROWS]
        with np.errstate(invalid="ignore", over="ignore"):   # rows that are not finite score NaN or inf
            products = np.asarray(np.asarray(vectors)[part], dtype=np.float64) * q   # a plain view: memmap indexing is slower
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
        self._lows: list[np.ndarray] = [np.empty(0)]
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
        self._lows.append(low[keep])
        self._highs.append(high[keep])
        self._kept += int(np.count_nonzero(keep))
        if self._kept > 4 * self.k + 65536:
            self._prune()

    def _prune(self) -> None:
        rows, lows, highs = np.concatenate(self._rows), np.concatenate(self._lows), np.concatenate(self._highs)
        keep = highs >= self.floor
        self._rows, self._lows, self._highs = [rows[keep]], [lows[keep]], [highs[keep]]
        self._kept = int(np.count_nonzero(keep))

    def rows(self) -> np.ndarray:
        return self.bounds()[0]

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows ascending, their low bounds, their high bounds)."""
        self._prune()
        order = np.argsort(self._rows[0], kind="stable")
        return self._rows[0][order], self._lows[0][order], self._highs[0][order]


def rank_exactly(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray, min_score: float | None,
                 bounds: tuple[np.ndarray, np.ndarray] | None = None,
                 damaged: list | None = None, info: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate rows canonically; the k best, best first, equal scores by ascending row.

    `bounds` (low, high) per row, when given, were proven for the canonical scores: a row scoring outside
    them has a damaged float32 row or int8 copy, and is left out and appended to `damaged`. With bounds the
    rows are re-scored highest upper bound first, RESCORE_ROWS at a time, until every row left has an upper
    bound below the k-th best score found (or below min_score): such a row's canonical score is below it too,
    so it cannot be in the result (a tie with the k-th needs high >= its score: that row is re-scored).
    Issue 22: of ~450 candidates of a random 100k index, ~170 can reach the result. info["rescored"]: how many
    rows were re-scored.
    """
    if bounds is None or len(rows) <= RESCORE_ROWS:
        if info is not None:
            info["rescored"] = len(rows)
        return _ranked(vectors, query, k, rows, min_score, bounds, damaged)
    reach = np.where(np.isnan(bounds[1]), np.inf, bounds[1])          # a NaN bound proves nothing: re-scored first
    order = np.argsort(-reach, kind="stable")
    rows, low, high, reach = rows[order], bounds[0][order], bounds[1][order], reach[order]
    floor = -np.inf if min_score is None else float(min_score)
    best_rows, best_scores = np.empty(0, np.int64), np.empty(0, np.float32)
    for start in range(0, len(rows), RESCORE_ROWS):
        if reach[start] < floor:                    # sorted: no row from here on can reach the result
            break
        if info is not None:
            info["rescored"] = min(len(rows), start + RESCORE_ROWS)
        part = slice(start, start + RESCORE_ROWS)
        found, scores = _ranked(vectors, query, k, rows[part], min_score, (low[part], high[part]), damaged)
        merged = np.concatenate([best_rows, found]), np.concatenate([best_scores, scores])
        best_rows, best_scores = _ranked_pairs(*merged, k)
        if len(best_scores) == k:
            floor = max(floor, float(best_scores[-1]))
    return best_rows, best_scores


def _ranked(vectors, query, k, rows, min_score, bounds, damaged) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `rows` by canonical score (rank_exactly without the early stop)."""
    scores = exact_scores(vectors, rows, query)
    keep = ~np.isnan(scores)
    if bounds is not None:
        with np.errstate(invalid="ignore"):
            broken = ~((bounds[0] <= scores) & (scores <= bounds[1])) & np.isfinite(bounds[0]) & np.isfinite(bounds[1])
        if broken.any():
            keep &= ~broken
            if damaged is not None:
                damaged.extend(rows[broken].tolist())
    if min_score is not None:
        keep &= scores >= min_score
    return _ranked_pairs(rows[keep], scores[keep], k)


def _ranked_pairs(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
    unit: bool = False,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `vectors` [N, d] (a memmap is fine) with the highest canonical score against `query`.

    `mask` [N] bool keeps only rows where it is True; `min_score` drops lower scores. Returns
    (rows int64, scores float32), best first, equal scores by ascending row (see the module docstring for
    the exact contract). A float32 BLAS pass bounds every score; only rows whose bound reaches the k-th
    best are re-scored. Never a full sort. `unit`: the rows are unit vectors by construction, so a row
    whose norm is off by more than UNIT_TOLERANCE (or not finite) is damaged: it is left out, and listed
    in info["damaged"].
    """
    query = _check_inputs(vectors, query, k, mask)
    if k == 0 or len(vectors) == 0:
        return _empty()
    damaged: list[int] = []
    candidates = _Candidates(k, min_score)
    for rows, low, high in _float32_bounds(vectors, query, mask, chunk_rows, unit=unit, damaged=damaged):
        candidates.add(rows, low, high)
    result = rank_exactly(vectors, query, k, candidates.rows(), min_score)
    _report(info, damaged)
    return result


def _report(info: dict | None, damaged: list[int]) -> None:
    if info is not None and damaged:
        info["damaged"] = sorted(set(info.get("damaged", [])) | set(int(r) for r in damaged))


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
    vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, chunk_rows: int, first_row: int = 0,
    *, unit: bool = False, damaged: list | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row ids, low, high) per block of valid rows: bounds of their canonical scores from a float32 product.

    `unit`: rows whose norm shows damage (see top_k) are left out and appended to `damaged`.
    """
    q32 = np.asarray(query, dtype=np.float32)
    d = vectors.shape[1]
    factor = 2 * (d + 4) * _U * float(np.linalg.norm(query.astype(np.float64))) * (1 + BOUND_SLACK)
    for rows, block, keep in _float32_blocks(vectors, mask, chunk_rows):
        block = np.asarray(block, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):   # rows that are not finite get NaN bounds: kept
            scores = block @ q32
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            if keep is not None:
                rows, scores, norms = rows[keep], scores[keep], norms[keep]
            if unit:
                bad = ~(np.abs(norms.astype(np.float64) - 1.0) <= UNIT_TOLERANCE)    # NaN counts as bad
                if bad.any():
                    if damaged is not None:
                        damaged.extend((rows[bad] + first_row).tolist())
                    rows, scores, norms = rows[~bad], scores[~bad], norms[~bad]
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
    unit: bool = False,
    path: str | None = None,
    sessions: SessionFactory | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` with the same result, scoring rows < quantized.rows through their int8 copy, whose integer
    kernel's session `sessions` makes (int8_kernel.py; None: the float32 pass answers).

    Falls back to `top_k` where the int8 pass would not pay or cannot run (few rows, a sparse mask, a
    query that is zero or not finite, onnxruntime missing or inexact on this CPU), or where the float32
    pass is the faster one on this machine (int8_kernel.preferred_path, measured once for copies of at
    least CALIBRATE_FROM_ROWS rows; `path` forces a pass). `info`, when given, receives "path" ("int8" or "float32"),
    "candidates" (rows whose bounds reach the k-th best low) and "rescored" (those re-scored: rank_exactly).

    Damage cannot change the answer unseen. A block whose kernel output disagrees with its check record
    (damaged codes) is scored in float32 instead (info["int8_damaged_blocks"]). A candidate whose canonical
    score falls outside its proven bounds has a damaged float32 row (or statistics): it is left out, the
    search runs again without it (its bounds may have raised the k-th best low), and it is listed in
    info["damaged"], as are rows that `unit` finds damaged (see top_k).
    """
    query = _check_inputs(vectors, query, k, mask)
    n = len(vectors)
    covered = 0 if quantized is None else quantized.rows
    if covered > n:
        raise ValueError(f"the int8 copy covers {covered} rows, the vectors have only {n}")
    wanted = path == "int8" or (covered >= QUANT_MIN_ROWS and path is None)     # "int8": its proof is wanted
    kernel = int8_kernel(vectors.shape[1], sessions) if covered and wanted else None
    if kernel and path is None and covered >= CALIBRATE_FROM_ROWS and \
            preferred_path(vectors.shape[1], lambda d: measure_passes(d, sessions)) != "int8":
        kernel = None
    usable = (
        kernel is not None and k > 0 and np.all(np.isfinite(query)) and np.any(query)
        and (mask is None or np.count_nonzero(mask) >= QUANT_SPARSE_SHARE * n)
    )
    if not usable:
        if info is not None:
            info.update(path="float32")
        return top_k(vectors, query, k, mask=mask, min_score=min_score, chunk_rows=chunk_rows, unit=unit, info=info)
    damaged: list[int] = []
    for _ in range(MAX_DAMAGED_RERUNS):
        candidates = _Candidates(k, min_score)
        rows, low, high, bad_blocks = _int8_bounds(quantized, kernel, query, k, None if mask is None else mask[:covered],
                                                   min_score)
        candidates.add(rows, low, high)
        rescan = None
        if len(bad_blocks):                     # damaged codes: those blocks' rows through the float32 pass
            rescan = np.zeros(covered, bool)
            for b in bad_blocks:
                rescan[b * quantized.block:(b + 1) * quantized.block] = True
            if mask is not None:
                rescan &= mask[:covered]
            if info is not None:
                info["int8_damaged_blocks"] = [int(b) for b in bad_blocks]
        parts = [(vectors[covered:], covered, None if mask is None else mask[covered:])]     # the rows past the copy
        if rescan is not None:
            parts.append((vectors[:covered], 0, rescan))
        for part, first, part_mask in parts:
            for r, lo, hi in _float32_bounds(part, query, part_mask, chunk_rows, first_row=first, unit=unit, damaged=damaged):
                candidates.add(r, lo, hi)
        rows, lows, highs = candidates.bounds()
        found: list[int] = []
        rows, lows, highs = _tightened(vectors, query, k, min_score, (rows, lows, highs), found)
        result = rank_exactly(vectors, query, k, rows, min_score, bounds=(lows, highs), damaged=found, info=info)
        if info is not None:
            info.update(path="int8", candidates=len(rows))
        if not found:
            _report(info, damaged)
            return result
        damaged.extend(found)                   # search again without them: they took part in the k-th best low
        mask = np.ones(n, bool) if mask is None else mask.copy()
        mask[found] = False
    raise DamagedRowsError(f"{len(set(damaged))} rows of the index disagree with their int8 copy")


def _int8_bounds(
    quantized: QuantizedRows, kernel: Int8Kernel, query: np.ndarray, k: int,
    mask: np.ndarray | None, min_score: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, low, high) of the quantised rows that can still matter (see the module docstring), and the
    blocks whose kernel output fails their check record (their rows are not among those rows)."""
    q = query.astype(np.float64)
    half = kernel.half_range
    q_scale = float(np.abs(q).max()) / half
    h = np.clip(np.rint(q / q_scale), -half, half)
    q_hat = h * q_scale
    q_norm, dq_norm, q_hat_norm = (float(np.linalg.norm(x)) for x in (q, q - q_hat, q_hat))
    max_err, max_norm = quantized.max_bounds()
    per_norm = dq_norm + BOUND_SLACK * (q_norm + q_hat_norm)
    tiny = _underflow(len(q), q_scale)
    widest = (max_err * q_norm + max_norm * per_norm) * (1 + BOUND_SLACK) + tiny

    shifted = (h + half).astype(np.uint8)
    dots = kernel.dots(quantized.codes, shifted)                          # c_i.(h + half), exact int32
    bad_blocks = np.empty(0, np.int64)
    if quantized.checks is not None:                                      # sum_i c_i.a = cols.a, exactly
        wide = np.int64 if CODE_RANGE * 2 * half * dots.shape[1] * len(q) >= 2 ** 31 else np.int32   # int32: exact, faster
        bad_blocks = np.flatnonzero(dots.sum(axis=1, dtype=wide) != quantized.check_sums(shifted, kernel))
    dots -= quantized.offsets(half)                                       # c_i.h
    approx = dots.astype(np.float32)
    approx *= quantized.stat("scale")                                      # A_i / s_q
    for b in bad_blocks:
        approx[b] = -np.inf
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
    tol = (err * q_norm + norm * per_norm) * (1 + BOUND_SLACK) + tiny
    if len(bad_blocks):
        rows_ok = ~np.isin(rows // quantized.block, bad_blocks)
        rows, a, tol = rows[rows_ok], a[rows_ok], tol[rows_ok]
    return rows, a - tol, a + tol, bad_blocks


def _tightened(vectors: np.ndarray, query: np.ndarray, k: int, min_score: float | None,
               candidates: tuple[np.ndarray, np.ndarray, np.ndarray], damaged: list
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 5 of the module docstring: the candidates' float32 products bound their canonical scores about
    100x tighter than the int8 copy (2(d+4)u ||v|| ||q|| against e ||q|| + n ||dq||). Each candidate keeps
    the intersection of both bounds, and those whose upper bound no longer reaches the k-th best lower bound
    are dropped: of ~1,000 candidates of a 100,000-row index, about k are left to re-score canonically,
    where 256-512 were. They are read by highest int8 upper bound first, TIGHTEN_ROWS at a time, until the
    next one's int8 upper bound is below the k-th best lower bound so far (nor can any after it reach it).
    A row whose two bounds do not meet has a damaged float32 row or int8 copy (the float32 bounds hold for
    whatever bytes the row has): it is appended to `damaged` and left out."""
    rows, low, high = candidates
    if len(rows) <= k:
        return rows, low, high
    reach = np.where(np.isnan(high), np.inf, high)
    order = np.argsort(-reach, kind="stable")
    plain = np.asarray(vectors)                    # a plain view: a memmap's fancy indexing is slower
    kept = _Candidates(k, min_score)
    for start in range(0, len(order), TIGHTEN_ROWS):
        part = order[start:start + TIGHTEN_ROWS]
        if reach[part[0]] < max(kept.floor, kept.min_score):
            break
        _, low32, high32 = next(_float32_bounds(plain[rows[part]], query, None, len(part)))
        low_t, high_t = np.fmax(low[part], low32), np.fmin(high[part], high32)   # a NaN bound proves nothing
        broken = low_t > high_t
        if broken.any():
            damaged.extend(rows[part][broken].tolist())
        kept.add(rows[part][~broken], low_t[~broken], high_t[~broken])
    return kept.bounds()


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


def measure_passes(d: int, sessions: SessionFactory | None, rows: int = CALIBRATION_ROWS) -> dict[str, float]:
    """Median seconds of a whole exact search (k = 10) by each pass over the same random unit rows: what an
    answer costs, bounds and re-scored candidates included, not the kernels alone (the integer GEMV measured
    alone misjudged a Xeon with AMX: 23 ms against 16 ms for the float32 product at 65,536 x 512, while the
    whole int8 pass answered 100,000 rows in 19 ms against 27 ms). Random rows put more candidates past the
    int8 bounds than CLIP-like ones do: the measurement errs toward float32."""
    import time

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows // QUANT_BLOCK * QUANT_BLOCK or rows, d), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    blocks = len(vectors) // QUANT_BLOCK
    quantized = None
    if blocks:
        codes, stats, _ = quantize_blocks(vectors[:blocks * QUANT_BLOCK], QUANT_BLOCK)
        quantized = QuantizedRows(np.frombuffer(codes, np.int8).reshape(blocks, d, QUANT_BLOCK),
                                  np.frombuffer(stats, "<f4").reshape(blocks, len(STATS), QUANT_BLOCK))
    queries = rng.standard_normal((CALIBRATION_REPEATS + 1, d), dtype=np.float32)
    seconds: dict[str, list[float]] = {"float32": [], "int8": []}
    for repeat, query in enumerate(queries):              # the first round warms caches and threads
        for path in seconds:                              # alternating: background load hits both alike
            info: dict = {}
            start = time.perf_counter()
            top_k_quantized(vectors, quantized, query, 10, path=path, sessions=sessions, info=info)
            if repeat and info.get("path") == path:       # a pass that could not run here never wins
                seconds[path].append(time.perf_counter() - start)
    return {path: float(np.median(times)) if times else float("inf") for path, times in seconds.items()}

"""The int8 copy of an index's vectors: codes, per-row statistics that make its bounds proven, check records.

exact.py's int8 pass reads this copy (its module docstring proves the bounds); exact_index.py writes and maps
it. A copy is blocks of QUANT_BLOCK rows (int8_kernel.py says why 64), each block's codes stored transposed
([d, block], the layout onnxruntime's integer GEMV reads), with per row the scale s, the sum of its codes,
e >= ||v - s*c|| and n >= max(||v||, ||s*c||), all computed in float64 and rounded up, and per block a check
record: its codes summed over its rows per dimension (so a search checks the kernel's output of every block
for free) and a weighted sum of its statistics' bits (read once per reader). `verify_quantized` spot-checks
a copy against the float32 rows before a reader trusts it; `codes_intact` reads every code (the writer's check).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .int8_kernel import CODE_RANGE

if TYPE_CHECKING:
    from .int8_kernel import Int8Kernel

STATS = ("scale", "colsum", "err", "norm")   # per-row float32 arrays stored with each block of codes
BOUND_SLACK = 2.0 ** -20  # relative room for float rounding of approximations, canonical scores and bounds
SPOT_CHECK_ROWS = 8192   # a reader re-quantises a row of the int8 copy this often (verify_quantized)


@dataclass
class QuantizedRows:
    """An int8 copy of rows 0..rows-1 of a vectors array, in blocks of `block` rows.

    codes [blocks, d, block] int8: codes[b, j, r] is dimension j of row b*block + r (each block is stored
    transposed, the layout onnxruntime's integer GEMV reads). stats [blocks, 4, block] float32: per row the
    scale s, the sum of its codes, e >= ||v - s*c|| and n >= max(||v||, ||s*c||) (STATS order).
    checks [blocks] (check_dtype), optional: per block the sums of its codes over its rows, one per
    dimension ("cols"), and a weighted sum of its statistics' bits ("stats"); see `block_checks`.
    """

    codes: np.ndarray
    stats: np.ndarray
    checks: np.ndarray | None = None
    _derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.codes.ndim != 3 or self.stats.shape != (self.codes.shape[0], len(STATS), self.codes.shape[2]):
            raise ValueError(f"int8 copy shapes do not match: codes {self.codes.shape}, stats {self.stats.shape}")
        if self.checks is not None and self.checks.shape != (self.codes.shape[0],):
            raise ValueError(f"int8 copy checks {self.checks.shape} do not match {self.codes.shape[0]} blocks")

    def head(self, blocks: int) -> "QuantizedRows":
        """The first `blocks` blocks."""
        return QuantizedRows(self.codes[:blocks], self.stats[:blocks], None if self.checks is None else self.checks[:blocks])

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

    def check_sums(self, shifted: np.ndarray, kernel: Int8Kernel | None = None) -> np.ndarray:
        """Per block, the sum over its rows of c_r . shifted (shifted uint8 [d]), exactly, from the check records.

        With `kernel`: the integer kernel sums the records' base-128 digits (`check_digits`), then the digits'
        sums are weighted in int64 (0.1 ms at 100,000 rows; numpy's integer matrix product took 0.8-1.8 ms of a
        2-core machine's 7-10 ms search, issue 22). Without: numpy, in int32 where no sum can reach 2^31
        (|cols| <= 127 * block per dimension, shifted <= 255), else int64."""
        if kernel is not None:
            digits = self.check_digits()
            per_digit = kernel.dots(digits, shifted).reshape(-1, self.codes.shape[0]).astype(np.int64)
            return (per_digit * (np.int64(128) ** np.arange(len(per_digit), dtype=np.int64))[:, None]).sum(axis=0)
        cols = self.checks["cols"]
        if CODE_RANGE * self.block * 255 * cols.shape[1] < 2 ** 31:
            return np.matmul(cols, shifted.astype(np.int32), dtype=np.int32)
        return cols.astype(np.int64) @ shifted.astype(np.int64)

    def check_digits(self) -> np.ndarray:
        """The check records' code sums per dimension as balanced base-128 digits, int8 [1, d, digits * blocks]:
        cols[b, j] = sum_t 128^t * digits[0, j, t * blocks + b], every digit in [-64, 63] (at most three
        digits for blocks of 64 rows, |cols| <= 127 * 64; four for blocks of 8,192). The integer kernel
        sums digits times a shifted query (<= 254) over d dimensions exactly in int32 (64 * 254 * d < 2^31
        for d < 130,000), the shape it was checked exact on."""
        if "digits" not in self._derived:
            rest = self.checks["cols"].astype(np.int64).T          # [d, blocks]
            digits = []
            while True:
                low = (rest + 64) % 128 - 64
                digits.append(low.astype(np.int8))
                rest = (rest - low) // 128
                if not rest.any():
                    break
            self._derived["digits"] = np.ascontiguousarray(np.concatenate(digits, axis=1)[None])
        return self._derived["digits"]

    def max_bounds(self) -> tuple[float, float]:
        """(max e, max n) over all rows."""
        if "max" not in self._derived:
            self._derived["max"] = (float(self.stat("err").max(initial=0.0)), float(self.stat("norm").max(initial=0.0)))
        return self._derived["max"]


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [m, d] int8, stats [4, m] float32) of float32 rows [m, d]; deterministic, see QuantizedRows."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # a damaged row (NaN, inf) quantises quietly: its bounds
        scale = (np.abs(v).max(axis=1, initial=0.0) / CODE_RANGE).astype(np.float32)   # are not finite, so
        scale[~(scale > 0)] = 1.0                      # search always re-scores it and leaves it out as damaged
        q = np.rint(v / scale[:, None])                # (a zero row: codes 0, its error is its norm)
        q[~np.isfinite(q)] = 0.0
        codes = np.clip(q, -CODE_RANGE, CODE_RANGE).astype(np.int8)
        approx = codes * scale.astype(np.float64)[:, None]
        err = np.linalg.norm(v - approx, axis=1)
        norm = np.maximum(np.linalg.norm(v, axis=1), np.linalg.norm(approx, axis=1))
    stats = np.stack([scale, codes.sum(axis=1, dtype=np.int64).astype(np.float32), _round_up(err), _round_up(norm)])
    return codes, stats


def quantize_block(vectors: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """The bytes one block adds to an int8 copy: (codes transposed [d, m], stats [4, m], its check record)."""
    return quantize_blocks(vectors, len(vectors))


def quantize_blocks(vectors: np.ndarray, block: int) -> tuple[bytes, bytes, bytes]:
    """The bytes that the blocks of `vectors` [m * block, d] add to an int8 copy, in one pass: codes transposed
    per block [m, d, block], stats [m, 4, block], check records [m] (the same bytes as quantize_block of each)."""
    codes, stats = quantize_rows(vectors)
    m, d = len(vectors) // block, vectors.shape[1]
    if m * block != len(vectors):
        raise ValueError(f"{len(vectors)} rows are not whole blocks of {block}")
    codes_t = np.ascontiguousarray(codes.reshape(m, block, d).transpose(0, 2, 1))
    stats = np.ascontiguousarray(stats.reshape(len(STATS), m, block).transpose(1, 0, 2), dtype="<f4")
    return codes_t.tobytes(), stats.tobytes(), blocks_checks(codes_t, stats).tobytes()


def check_dtype(d: int) -> np.dtype:
    """One block's check record: code sums per dimension (int32: |sum| <= 127 * rows), statistics' bits sum."""
    return np.dtype([("cols", "<i4", (d,)), ("stats", "<u8")])


def block_checks(codes_t: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The check record of one block, codes_t [d, block] int8, stats [4, block] float32.

    "cols" lets every search check the integer kernel's output of the block for free (sum over the block's
    rows of c_r . a = cols . a, exactly): a damaged code changes one side only (unless the query gives
    its dimension weight 0, when it does not change the scores either). "stats": a weighted sum of the
    statistics' bits, read once per reader (verify_quantized).
    """
    return blocks_checks(codes_t[None], stats[None])


def blocks_checks(codes_t: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The check records of blocks codes_t [m, d, block] int8, stats [m, 4, block] float32 (see block_checks)."""
    records = np.zeros(len(codes_t), check_dtype(codes_t.shape[1]))
    records["cols"] = codes_t.sum(axis=2, dtype=np.int64)
    records["stats"] = stats_checksum(stats)
    return records


def stats_checksum(stats: np.ndarray) -> np.ndarray:
    """Per block of stats [blocks, 4, block] float32: sum of (bits * position), mod 2^64, uint64."""
    bits = np.ascontiguousarray(stats, dtype="<f4").view(np.uint32).reshape(len(stats), -1).astype(np.uint64)
    weights = np.arange(1, bits.shape[1] + 1, dtype=np.uint64)
    return (bits * weights).sum(axis=1, dtype=np.uint64)


def _round_up(x: np.ndarray) -> np.ndarray:
    """float32 values >= x (float64): a bound stays a bound after storage."""
    return (x * (1 + BOUND_SLACK) + 2.0 ** -126).astype(np.float32)


def verify_quantized(quantized: QuantizedRows, vectors: np.ndarray, spacing: int | None = None) -> int:
    """How many leading blocks of `quantized` agree with `vectors` at the rows spot-checked.

    A spot check against a copy built from other vectors, a zero-filled or truncated-then-extended file:
    the blocks in groups spanning `spacing` rows (SPOT_CHECK_ROWS; one block each where blocks are wider), re-quantising the
    first row of each group's first block and the last row of its last block (every 8,192 rows, as when a
    block was 8,192 rows; re-quantising both ends of every 64-row block cost a cold query 0.4 s at 100,000
    rows on a loaded 2-core machine). Plus finite statistics and positive scales in every row, and the
    statistics' checksums where the copy has check records. A block that fails, or the first block of a
    group that fails, and every block after it, is not used (those rows are scanned in float32). Damage to
    codes inside a block is caught per search (`_int8_bounds`) or by `codes_intact`.
    """
    block, blocks = quantized.block, quantized.codes.shape[0]
    if blocks == 0:
        return 0
    sane = np.isfinite(quantized.stats).all(axis=(1, 2)) & (quantized.stat("scale") > 0).all(axis=1)
    if quantized.checks is not None:
        sane &= stats_checksum(quantized.stats) == quantized.checks["stats"]
    group = max(1, (SPOT_CHECK_ROWS if spacing is None else spacing) // block)
    firsts = np.arange(0, blocks, group)
    lasts = np.minimum(firsts + group, blocks) - 1
    picks = np.stack([firsts * block, lasts * block + block - 1], axis=1).reshape(-1)
    codes, stats = quantize_rows(np.asarray(vectors[picks]))
    codes, stats = codes.reshape(len(firsts), 2, -1), stats.reshape(len(STATS), len(firsts), 2)
    good = ((np.asarray(quantized.codes[firsts, :, 0]) == codes[:, 0]).all(axis=1)
            & (np.asarray(quantized.codes[lasts, :, block - 1]) == codes[:, 1]).all(axis=1)
            & (np.asarray(quantized.stats[firsts, :, 0]) == stats[:, :, 0].T).all(axis=1)
            & (np.asarray(quantized.stats[lasts, :, block - 1]) == stats[:, :, 1].T).all(axis=1))
    first_bad = [int(firsts[np.argmin(good)])] if not good.all() else []
    if not sane.all():
        first_bad.append(int(np.argmin(sane)))
    return min(first_bad, default=blocks)


def codes_intact(quantized: QuantizedRows) -> np.ndarray:
    """Per block: True when its codes sum to its check record (reads every code: the writer's check)."""
    blocks = quantized.codes.shape[0]
    if quantized.checks is None:
        return np.zeros(blocks, bool)
    intact = np.empty(blocks, bool)
    step = max(1, (16 << 20) // max(1, quantized.codes[0].size))       # about 16 MB of codes at once
    for first in range(0, blocks, step):
        sums = np.asarray(quantized.codes[first:first + step]).sum(axis=2, dtype=np.int64)
        intact[first:first + step] = (sums == quantized.checks["cols"][first:first + step]).all(axis=1)
    return intact

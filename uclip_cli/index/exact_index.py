"""The exact scan as a vector index: the float32 rows, and an int8 copy of them that finds the same result.

Files (next to the vectors file they copy; derived, rebuildable):
    vectors.<g>.q8codes   blocks of `quantized_block` rows; codes stored transposed per block
    vectors.<g>.q8rows    per row four float32 statistics (scale, code sum, error bound, norm bound)
    vectors.<g>.q8sums    per block a check record (int8_copy.block_checks): its codes summed over its rows,
                          and a checksum of its statistics
Named after the live vectors file (vectors.<g>.q8codes for vectors.<g>.f32); meta `quantized_rows` is the
committed coverage (a multiple of `quantized_block`; absent in indexes written before the copy: 0).

Damage to the copy means a float32 scan or a rebuild, never a missing result: readers check every block's
statistics against its record once, and every search checks the integer kernel's output of each block
against it (exact.top_k_quantized); a failing block's rows are scanned in float32. The writer's open
(`repair`) reads every code as well, and rewrites the copy from the first block that fails. A copy written
before the check records existed gets them at the next writer's open (until then: the spot check only).

The copy follows the store's commit rule. When appended rows complete one or more blocks, `add` quantises
them from the float32 rows just written, writes them past the committed coverage of both files (never
over a committed byte), truncates there, fsyncs, and the store's commit raises quantized_rows with the
rows. Before that commit: the old coverage, the new bytes are an ignored tail; after it: durable. Readers
use exactly the blocks meta covers, after a spot check (int8_copy.verify_quantized: sizes, finite statistics,
first and last row of each block re-quantised from the float32 rows); a missing, short or failing copy
only means those rows are scanned in float32 (slower, same result). `repair` (the writer's open) drops
an uncommitted tail, rewrites the copy from the first block that fails the check (its bytes were wrong
anyway), quantises any full blocks not yet covered, and returns the coverage to commit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .int8_kernel import QUANT_BLOCK, int8_kernel
from .exact import top_k_quantized
from .int8_copy import STATS, QuantizedRows, check_dtype, codes_intact, quantize_blocks, verify_quantized
from ..filecache import fsync_path
from .vector_index import VectorIndex, VectorSearcher

if TYPE_CHECKING:
    from ..sessions import SessionFactory

QUANT_CODES, QUANT_STATS, QUANT_SUMS = ".q8codes", ".q8rows", ".q8sums"
STAT_BYTES = len(STATS) * 4     # float32 statistics per row of the int8 copy
DTYPE = np.dtype("<f4")
WRITE_ROWS = 8192     # rows quantised and written at once (whole blocks)


def quantized_names(vectors_file: str) -> tuple[str, str, str]:
    """The int8 copy's file names for a vectors file: vectors.<g>.f32 -> vectors.<g>.q8codes, .q8rows, .q8sums."""
    stem = vectors_file.removesuffix(".f32")
    return stem + QUANT_CODES, stem + QUANT_STATS, stem + QUANT_SUMS


class ExactSearcher(VectorSearcher):
    """The exact result over every row: the int8 copy's verified blocks where that pays, float32 elsewhere."""

    exact = True

    def __init__(self, vectors: np.ndarray, maps: QuantizedRows | None, *, unit: bool = False,
                 sessions: SessionFactory | None = None):
        self.vectors = vectors
        self.sessions = sessions     # makes the int8 kernel's session; None: the float32 pass only
        self.covered = len(vectors)
        self.unit = unit
        self._maps = maps
        self._checked: dict[int, QuantizedRows | None] = {}    # first block -> its verified blocks from there
        self.prove = True   # rows it reads are not all checksum-verified: the int8 pass answers where it covers them

    def proven_rows(self) -> int:
        """Leading rows whose damage a search shows without their checksums: the int8 pass (taken for them
        while `prove`, below QUANT_MIN_ROWS too, where it costs about what the float32 pass does and spares
        the checksums) checks every candidate's float32 row against the copy's proven bounds (exact.py)."""
        quantized = self.quantized()
        if quantized is None or int8_kernel(self.vectors.shape[1], self.sessions) is None:
            return 0
        return quantized.rows

    def quantized(self, first_block: int = 0) -> QuantizedRows | None:
        """The int8 copy's blocks from `first_block` on that pass the check (up to the first that fails)."""
        if first_block not in self._checked:
            blocks = 0 if self._maps is None else self._maps.codes.shape[0]
            part = None
            if first_block < blocks:
                part = QuantizedRows(self._maps.codes[first_block:], self._maps.stats[first_block:],
                                     None if self._maps.checks is None else self._maps.checks[first_block:])
            self._checked[first_block] = _checked(part, self.vectors[first_block * self._block():])
        return self._checked[first_block]

    def warm(self) -> None:
        self.quantized()

    def search(self, query, k, *, mask=None, min_score=None, info=None, start: int = 0):
        """The exact top-k of the valid rows >= `start` (a tail that an approximate index does not cover)."""
        if start <= 0:
            return top_k_quantized(self.vectors, self.quantized(), query, k, mask=mask, min_score=min_score, info=info,
                                   unit=self.unit, sessions=self.sessions, path=self._path())
        first = min(start, self.covered) // self._block() if self._maps is not None else 0
        offset = first * self._block() if self._maps is not None else start
        offset = min(offset, self.covered)
        vectors = self.vectors[offset:]
        keep = np.arange(offset, self.covered) >= start
        if mask is not None:
            keep &= mask[offset:]
        part: dict = {}
        rows, scores = top_k_quantized(vectors, self.quantized(first) if self._maps is not None else None, query, k,
                                       mask=keep, min_score=min_score, info=part, unit=self.unit,
                                       sessions=self.sessions, path=self._path())
        if info is not None and part.get("damaged"):
            info["damaged"] = sorted(set(info.get("damaged", [])) | {r + offset for r in part["damaged"]})
        return rows + offset, scores

    def _path(self) -> str | None:
        return "int8" if self.prove and self.proven_rows() else None   # None: the faster pass on this CPU

    def _block(self) -> int:
        return self._maps.block if self._maps is not None else QUANT_BLOCK


class ExactIndex(VectorIndex):
    kind = "exact"

    @property
    def committed_rows(self) -> int:
        return self.quantized_rows

    def unbuilt(self) -> str:
        return (f"no int8 copy yet: it is made in blocks of {self.block:,} rows and the index has {self.rows:,} "
                "(searches scan the float32 rows, as fast at this size)")

    @property
    def quantized_rows(self) -> int:
        """Leading rows the int8 copy covers, as committed (searchers check them before use)."""
        return int(self.meta.get("quantized_rows", "0"))

    @property
    def block(self) -> int:
        return int(self.meta.get("quantized_block", QUANT_BLOCK))

    @property
    def unit(self) -> bool:
        """Rows are unit vectors by construction (every index uclip writes), so other norms mean damage."""
        return self.meta.get("unit_rows", "1") == "1"

    def files(self) -> set[str]:
        return set(quantized_names(self.vectors_file))

    @classmethod
    def claims(cls, name: str) -> bool:
        return name.endswith((QUANT_CODES, QUANT_STATS, QUANT_SUMS))

    def add(self, vectors: np.ndarray) -> dict[str, str]:
        rows = len(vectors)
        if rows // self.block * self.block <= self.quantized_rows:
            return {}
        return self._write(self.vectors_file, vectors, self.quantized_rows, self.block)

    def rebuild(self, vectors_file: str, vectors: np.ndarray) -> dict[str, str]:
        return self._write(vectors_file, vectors, 0, QUANT_BLOCK)

    def verify(self, vectors: np.ndarray) -> int:
        """Rows of the leading blocks that pass every check, reading every code (the writer's, `uclip check`'s)."""
        checked = _checked(self._maps(), vectors)
        if checked is None or checked.checks is None:
            return 0
        intact = codes_intact(checked)
        return int(np.argmin(intact) if not intact.all() else len(intact)) * checked.block

    def repair(self, vectors: np.ndarray) -> dict[str, str]:
        good = self.verify(vectors)
        start, block = (good, self.block) if good else (0, QUANT_BLOCK)
        changes = self._write(self.vectors_file, vectors, start, block)
        return {key: value for key, value in changes.items() if self.meta.get(key) != value}

    def searcher(self, vectors: np.ndarray) -> ExactSearcher:
        return ExactSearcher(vectors, self._maps(), unit=self.unit, sessions=self.sessions)

    # ---------------------------------------------------------------- internals

    def _maps(self) -> QuantizedRows | None:
        """Read-only maps of the committed blocks, or None where meta or the files lack them (the check
        records may be missing: a copy written before them)."""
        covered, block, d = self.quantized_rows, self.block, self.d
        if covered <= 0 or block <= 0 or covered % block or covered > self.rows:
            return None
        codes_path, stats_path, sums_path = (self.folder / name for name in quantized_names(self.vectors_file))
        blocks = covered // block
        codes = _map_whole(codes_path, np.int8, (blocks, d, block))
        stats = _map_whole(stats_path, DTYPE, (blocks, len(STATS), block))
        checks = _map_whole(sums_path, check_dtype(d), (blocks,))
        return None if codes is None or stats is None else QuantizedRows(codes, stats, checks)

    def _write(self, vectors_file: str, vectors: np.ndarray, start: int, block: int) -> dict[str, str]:
        """Quantise the full blocks from row `start` of `vectors` into the int8 copy of `vectors_file`.

        Writes only past `start`, truncates both files at the new coverage (dropping any uncommitted
        tail) and fsyncs them. Returns the meta values that make the copy live once committed.
        """
        rows, d = vectors.shape
        end = rows // block * block
        paths = [self.folder / name for name in quantized_names(vectors_file)]
        created = not all(path.exists() for path in paths)
        if created:
            start = 0                              # a copy without its check records: written again whole
        record = check_dtype(d).itemsize
        offsets = (lambda first: first * d, lambda first: first * STAT_BYTES, lambda first: first // block * record)
        files = [os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b") for path in paths]
        step = max(1, WRITE_ROWS // block) * block        # whole blocks quantised at once
        try:
            for first in range(start, end, step):
                stop = min(first + step, end)
                for f, data, at in zip(files, quantize_blocks(vectors[first:stop], block), offsets):
                    f.seek(at(first))
                    f.write(data)
            for f, at in zip(files, offsets):
                f.truncate(at(end))
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files:
                f.close()
        if created:
            fsync_path(self.folder)
        return {"quantized_rows": str(end), "quantized_block": str(block)}


def _checked(maps: QuantizedRows | None, vectors: np.ndarray) -> QuantizedRows | None:
    if maps is None:
        return None
    good = verify_quantized(maps, vectors)
    return maps.head(good) if good else None


def _map_whole(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """A read-only map of the start of `path` as `shape`, or None when the file is missing or shorter."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size < int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)

"""The index's two append-only float32 row files: the frozen image features and the search vectors.

    features[.<g>].f32   frozen CLIP image features, little-endian float32, d_clip per row, row r at byte r*d_clip*4
    vectors[.<g>].f32    search vectors (Head_B(features), or the features themselves while the bundle has
                         no trained heads), float32, d_search per row
    features[.<g>].crc, vectors[.<g>].crc   the CRC-32 of each row of the file beside it, little-endian uint32

Integrity: a flipped bit inside a row keeps the file well-formed and, for a sign bit, the row's length, so
neither the norm check nor SQLite can see it, and the row silently drops out of answers. Each row carries
its CRC-32 (every single-bit and every burst error up to 32 bits is detected), written with the row and
fsynced before the commit that makes it live, truncated and regenerated with it. `unsound(kind, rows)`
checks rows against them: `uclip check` checks every row, a re-projection every feature it projects, and a
search the rows it reads that no int8 copy proves (search.py). An index written before checksums gets
them from its next writer (computed from the rows as they are then).

A `RowFiles` object owns the bytes; the catalogue's meta (catalogue.py) owns the facts about them: the
committed row count, the dimensions, and the names of the live files (generation g after a re-projection or
a compaction). The object reads that meta as it stands, never a copy, so both always name the same files.

The rules it keeps for the store's crash-safety argument (store.py): a batch's rows are appended after the
committed ones, over any uncommitted tail, and fsynced before the commit that makes them live; committed
bytes are never written again; a new generation is written to new files from scratch (fsynced, removed
again when writing fails) and becomes live only by the catalogue's switch. Readers map exactly the
committed rows; a file shorter than the committed count is damage, reported with the way to recover.
"""
from __future__ import annotations

import errno
import os
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from ..filecache import fsync_path
from .errors import IndexCorruptError

DTYPE = np.dtype("<f4")
CRC_DTYPE = np.dtype("<u4")
KINDS = ("features", "vectors")
ROW_FILE_NAME = re.compile(r"(features|vectors)(\.[1-9][0-9]*)?\.f32")


def row_file_name(kind: str, generation: int) -> str:
    return f"{kind}.f32" if generation == 0 else f"{kind}.{generation}.f32"


def crc_name(row_file: str) -> str:
    """The checksum file of a row file: vectors.3.f32 -> vectors.3.crc."""
    return row_file.removesuffix(".f32") + ".crc"


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's little-endian float32 bytes, [n, 1] uint32 (2 us per row of 512 values)."""
    rows = np.ascontiguousarray(rows, dtype=DTYPE)
    if rows.size == 0:
        return np.empty((len(rows), 1), CRC_DTYPE)
    raw, width = memoryview(rows).cast("B"), rows.shape[1] * DTYPE.itemsize
    crcs = np.fromiter((zlib.crc32(raw[i * width:(i + 1) * width]) for i in range(len(rows))), CRC_DTYPE, len(rows))
    return crcs[:, None]


def rows_array(array, n: int, dim: int, what: str) -> np.ndarray:
    """`array` as n contiguous float32 rows of `dim` values, checked finite (ValueError otherwise)."""
    if array is None:
        if n == 0:
            return np.empty((0, dim), dtype=DTYPE)
        raise ValueError(f"{what} missing for {n} embedded files")
    array = np.ascontiguousarray(array, dtype=DTYPE)
    if array.shape != (n, dim):
        raise ValueError(f"{what} has shape {array.shape}, expected ({n}, {dim})")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def append_rows(path: Path, first_row: int, rows: np.ndarray) -> None:
    """Write rows after the committed ones of one row file (dropping any uncommitted tail) and fsync."""
    offset = first_row * rows.shape[1] * DTYPE.itemsize
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(rows.tobytes())
        f.flush()
        os.fsync(f.fileno())


class RowFiles:
    """The row files of one index folder, as the catalogue's meta `meta` names and counts them."""

    def __init__(self, folder: Path, meta: Mapping[str, str]):
        self.folder = folder
        self.meta = meta

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    def dim(self, kind: str) -> int:
        return int(self.meta["d_clip"] if kind == "features" else self.meta["d_search"])

    def path(self, kind: str) -> Path:
        return self.folder / self.meta[f"{kind}_file"]

    def crc_path(self, kind: str) -> Path:
        return self.folder / crc_name(self.meta[f"{kind}_file"])

    def names(self) -> set[str]:
        rows = {self.meta["features_file"], self.meta["vectors_file"]}
        return rows | {crc_name(name) for name in rows}

    def file_rows(self, kind: str) -> int:
        """Whole rows the named row file holds (0 when it is missing)."""
        try:
            return self.path(kind).stat().st_size // (self.dim(kind) * DTYPE.itemsize)
        except OSError:
            return 0

    # ---------------------------------------------------------------- reading

    def map(self, kind: str) -> np.ndarray:
        """The committed rows of one row file, read-only; FileNotFoundError when it is gone, IndexCorruptError
        when it holds fewer rows than committed."""
        dim, rows, path = self.dim(kind), self.rows, self.path(kind)
        if rows == 0:
            if not path.exists():
                raise FileNotFoundError(errno.ENOENT, "row file missing", str(path))
            return np.empty((0, dim), dtype=DTYPE)
        size = path.stat().st_size
        if size < rows * dim * DTYPE.itemsize:
            raise self.short(path, size)
        return np.memmap(path, dtype=DTYPE, mode="r", shape=(rows, dim))

    def map_file(self, name: str, rows: int, d: int) -> np.ndarray:
        """A read-only map of `rows` rows of the vectors file `name` (committed or just written)."""
        if rows == 0:
            return np.empty((0, d), dtype=DTYPE)
        return np.memmap(self.folder / name, dtype=DTYPE, mode="r", shape=(rows, d))

    def crc_map(self, kind: str) -> np.ndarray | None:
        """The committed rows' checksums, read-only; None where there are none (an index written before them,
        until its next writer)."""
        path, rows = self.crc_path(kind), self.rows
        try:
            if path.stat().st_size < rows * CRC_DTYPE.itemsize:
                return None
        except FileNotFoundError:
            return None
        return np.memmap(path, dtype=CRC_DTYPE, mode="r", shape=(rows,)) if rows else np.empty(0, CRC_DTYPE)

    def unsound(self, kind: str, rows: np.ndarray | None = None, *, data: np.ndarray | None = None,
                crcs: np.ndarray | None = None) -> np.ndarray:
        """The rows (of `rows`, default all committed) whose bytes fail their checksum, ascending; none where
        there are no checksums. `data` / `crcs`: the maps to check (a reader's snapshot), else mapped now."""
        crcs = self.crc_map(kind) if crcs is None else crcs
        if crcs is None:
            return np.empty(0, np.int64)
        data = self.map(kind) if data is None else data
        rows = np.arange(len(crcs), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        bad = []
        for start in range(0, len(rows), 8192):
            part = rows[start:start + 8192]
            first, last = int(part[0]), int(part[-1]) + 1
            in_place = last - first == len(part) and bool(np.all(np.diff(part) == 1))
            chunk = data[first:last] if in_place else data[part]    # a range of rows: read where it lies
            bad.append(part[row_crcs(chunk)[:, 0] != crcs[part]])
        return np.concatenate(bad) if bad else np.empty(0, np.int64)

    def short(self, path: Path, size: int | None) -> IndexCorruptError:
        """The message for a row file that is missing (size None) or holds fewer rows than committed."""
        state = "is missing" if size is None else f"holds {size} bytes, fewer than the {self.rows} rows committed"
        if path.name == self.meta.get("vectors_file") and self.file_rows("features") >= self.rows:
            return IndexCorruptError(f"{path} {state}: run `uclip index` once to compute the search vectors again "
                                     "from the stored image features (no photo is decoded)")
        return IndexCorruptError(f"{path} {state}: restore it, or run `uclip index --rebuild` (embeds every photo again)")

    # ---------------------------------------------------------------- writing

    def append(self, first_row: int, features: np.ndarray, vectors: np.ndarray) -> None:
        """Write a batch's rows after the committed ones (dropping any uncommitted tail) and fsync both."""
        append_rows(self.path("features"), first_row, features)
        append_rows(self.path("vectors"), first_row, vectors)
        append_rows(self.crc_path("features"), first_row, row_crcs(features))
        append_rows(self.crc_path("vectors"), first_row, row_crcs(vectors))

    def create_empty(self, generation: int) -> dict[str, str]:
        """Empty row files of a new generation, fsynced with the folder; the meta values naming them."""
        names = {f"{kind}_file": row_file_name(kind, generation) for kind in KINDS}
        for name in names.values():
            for file in (name, crc_name(name)):
                with open(self.folder / file, "wb") as f:
                    os.fsync(f.fileno())
        fsync_path(self.folder)
        return names

    @contextmanager
    def new_file(self, name: str) -> Iterator[Callable[[np.ndarray], None]]:
        """A row file and its checksums written from scratch (write(rows) per chunk) and fsynced; both removed
        again if writing fails."""
        paths = (self.folder / name, self.folder / crc_name(name))
        files = [open(path, "wb") for path in paths]

        def write(rows: np.ndarray) -> None:
            files[0].write(np.ascontiguousarray(rows, dtype=DTYPE).tobytes())
            files[1].write(row_crcs(rows).tobytes())
        try:
            yield write
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            for f, path in zip(files, paths):
                f.close()
                path.unlink(missing_ok=True)
            raise
        for f in files:
            f.close()

    def write_projected(self, name: str, project: Callable[[np.ndarray], np.ndarray], d: int, chunk_rows: int,
                        progress: Callable[[int, int], None] | None) -> np.ndarray:
        """A new vectors file `name`: project(features) of every committed row, chunk by chunk. Returns the rows
        whose features failed their checksum (their vectors are of damaged features: the caller drops them)."""
        features, crcs = self.map("features"), self.crc_map("features")
        unsound = []
        with self.new_file(name) as write:
            for start in range(0, self.rows, chunk_rows):
                chunk = np.array(features[start:start + chunk_rows], dtype=DTYPE)
                if crcs is not None:
                    bad = np.flatnonzero(row_crcs(chunk)[:, 0] != crcs[start:start + chunk_rows])
                    chunk[bad] = 0.0           # a damaged row's vector is never used: its row is dropped
                    unsound.append(start + bad)
                write(rows_array(project(chunk), len(chunk), d, "projected vectors"))
                if progress:
                    progress(min(start + chunk_rows, self.rows), self.rows)
        return np.concatenate(unsound) if unsound else np.empty(0, np.int64)

    def write_kept(self, names: Mapping[str, str], keep: np.ndarray, chunk_rows: int) -> None:
        """New row files `names` ({kind}_file -> name) holding only the rows `keep` (ascending), in order."""
        for kind in KINDS:
            source = self.map(kind)
            with self.new_file(names[f"{kind}_file"]) as write:
                for start in range(0, len(keep), chunk_rows):
                    write(source[keep[start:start + chunk_rows]])

    def recover(self) -> tuple[bool, list[str]]:
        """Writer's open: cut what an interrupted batch appended past the committed rows. A vectors file
        short of them while the features are whole asks for re-projection (returned True, with a note);
        any other short file is damage (IndexCorruptError)."""
        needs_reprojection, notes = False, []
        for kind in KINDS:
            path = self.path(kind)
            committed = self.rows * self.dim(kind) * DTYPE.itemsize
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                actual = -1
            if actual < committed:
                if kind == "vectors" and self.file_rows("features") >= self.rows:
                    needs_reprojection = True       # search vectors again from the features: no photo decoded
                    notes.append(f"note: {path} is {'missing' if actual < 0 else 'short'}: the search vectors "
                                 "are computed again from the stored image features")
                    continue
                raise self.short(path, max(actual, 0))
            if actual > committed:
                os.truncate(path, committed)
                fsync_path(path)
            self._recover_crcs(kind)
        return needs_reprojection, notes

    def _recover_crcs(self, kind: str) -> None:
        """The checksum file holds exactly the committed rows': an uncommitted tail cut, the rows of an index
        written before checksums (or a lost checksum file) computed from the rows as they are now."""
        path, rows = self.crc_path(kind), self.rows
        committed = rows * CRC_DTYPE.itemsize
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            path.touch()
            actual = 0
        if actual > committed:
            os.truncate(path, committed)
        elif actual < committed:
            have = actual // CRC_DTYPE.itemsize
            data = self.map(kind)
            for start in range(have, rows, 65536):
                append_rows(path, start, row_crcs(data[start:min(start + 65536, rows)]))
        else:
            return
        fsync_path(path)

    @staticmethod
    def is_row_file(name: str) -> bool:
        """A name a row file (or one being written) may have: the writer's open deletes those not live."""
        return name.endswith((".f32", ".f32.tmp", ".crc"))

    def fsync_folder(self) -> None:
        fsync_path(self.folder)   # O_RDONLY on a directory is allowed, and fsync makes its entries durable

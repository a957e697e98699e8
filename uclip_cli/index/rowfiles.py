"""The index's two append-only float32 row files: the frozen image features and the search vectors.

    features[.<g>].f32   frozen CLIP image features, little-endian float32, d_clip per row, row r at byte r*d_clip*4
    vectors[.<g>].f32    search vectors (Head_B(features), or the features themselves while the bundle has
                         no trained heads), float32, d_search per row

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
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from ..filecache import fsync_path
from .errors import IndexCorruptError

DTYPE = np.dtype("<f4")
KINDS = ("features", "vectors")
ROW_FILE_NAME = re.compile(r"(features|vectors)(\.[1-9][0-9]*)?\.f32")


def row_file_name(kind: str, generation: int) -> str:
    return f"{kind}.f32" if generation == 0 else f"{kind}.{generation}.f32"


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

    def names(self) -> set[str]:
        return {self.meta["features_file"], self.meta["vectors_file"]}

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

    def create_empty(self, generation: int) -> dict[str, str]:
        """Empty row files of a new generation, fsynced with the folder; the meta values naming them."""
        names = {f"{kind}_file": row_file_name(kind, generation) for kind in KINDS}
        for name in names.values():
            with open(self.folder / name, "wb") as f:
                os.fsync(f.fileno())
        fsync_path(self.folder)
        return names

    @contextmanager
    def new_file(self, name: str) -> Iterator:
        """A row file written from scratch and fsynced; removed again if writing fails."""
        path = self.folder / name
        f = open(path, "wb")
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise
        f.close()

    def write_projected(self, name: str, project: Callable[[np.ndarray], np.ndarray], d: int, chunk_rows: int,
                        progress: Callable[[int, int], None] | None) -> None:
        """A new vectors file `name`: project(features) of every committed row, chunk by chunk."""
        features = self.map("features")
        with self.new_file(name) as out:
            for start in range(0, self.rows, chunk_rows):
                chunk = np.asarray(features[start:start + chunk_rows], dtype=DTYPE)
                out.write(rows_array(project(chunk), len(chunk), d, "projected vectors").tobytes())
                if progress:
                    progress(min(start + chunk_rows, self.rows), self.rows)

    def write_kept(self, names: Mapping[str, str], keep: np.ndarray, chunk_rows: int) -> None:
        """New row files `names` ({kind}_file -> name) holding only the rows `keep` (ascending), in order."""
        for kind in KINDS:
            source = self.map(kind)
            with self.new_file(names[f"{kind}_file"]) as out:
                for start in range(0, len(keep), chunk_rows):
                    out.write(np.ascontiguousarray(source[keep[start:start + chunk_rows]]).tobytes())

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
        return needs_reprojection, notes

    @staticmethod
    def is_row_file(name: str) -> bool:
        """A name a row file (or one being written) may have: the writer's open deletes those not live."""
        return name.endswith((".f32", ".f32.tmp"))

    def fsync_folder(self) -> None:
        fsync_path(self.folder)   # O_RDONLY on a directory is allowed, and fsync makes its entries durable

"""The approximate vector index: FAISS IVF-PQ over a prefix of the rows, derived like the exact one.

What it is
----------
An inverted-file index with product-quantised codes (`faiss.IndexIVFPQ`, inner product): a coarse
quantiser of `nlist` centroids, each row stored in its nearest centroid's list as a PQ code of
`d/8` bytes with its row number (72 bytes a row at d = 512). A query scans the `nprobe` lists
nearest to it; search.py re-scores the candidates it returns exactly from the float32 rows, so every
printed score is a true cosine, and scans the rows the index does not cover yet exactly. Why IVF-PQ
and these sizes: bench/README.md (measured against an HNSW graph).

One file, `<vectors stem>.ann<seq>.faiss`, for the live vectors file, written whole and never
changed; meta names it (ann_file), the vectors file it indexes (ann_vectors: any other generation
makes it stale, i.e. unused), how many leading rows it covers (ann_rows), how many rows its quantiser
was trained on (ann_trained), its size and two blake2b digests: of its head (everything but the lists'
codes and ids, which come last in the file: ann_head, ann_head_sum) and of the whole file (ann_sum).

When it is built, extended, retrained or dropped (`add`, the store calls it with every batch)
-------------------------------------------------------------------------------------------
Setting ann_mode: "auto" (the default) keeps an index once the rows reach AUTO_MIN_ROWS, where exact
search stops meeting its latency target on two cores (bench/README.md); "on" keeps one at any size;
"off" never. New rows are searchable at once (the exact tail scan); once more than TAIL_ROWS rows
lie past the coverage, `add` adds them to a copy of the index and writes it as a new file. When the
rows have grown past RETRAIN_GROWTH times what the quantiser was trained on, it is trained again on a
new sample with an `nlist` for the new size. A re-projection or a compaction (new vectors, renumbered
rows) builds a new one (`rebuild`). Removed rows stay in the lists: search filters them out through
the catalogue's mask, and compaction (25 % dead) rebuilds.

Crash safety
------------
The same rule as the rest of the index (vector_index.py): a new file is written and fsynced before the
store's commit names it; a crash before the commit leaves an orphan the next writer's open deletes, and
the previous file (or none: the exact scan) in force. Readers open the file their snapshot names.

Damage
------
Readers check what a query relies on before faiss reads it: the file's size, and the head's digest
(centroids, codebooks, list sizes: 10-20 MB at 10 M rows; a damaged head could send faiss reading past
the file). Damage inside the lists' codes and ids can only change which candidates come back: ids
outside the covered rows are dropped, every candidate is re-scored exactly, so printed scores stay
true, and at worst a damaged list misses a match. The whole-file digest is checked where that cost
is paid once: the writer's open (which rebuilds a damaged index) and `uclip check`.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import threading
from pathlib import Path
import numpy as np

from ..errors import UclipError
from ..filecache import fsync_path
from .vector_index import VectorIndex, VectorSearcher

MODES = ("auto", "on", "off")
AUTO_MIN_ROWS = 1_000_000      # "auto" keeps an ANN index from this many rows (measured: bench/README.md)
TAIL_ROWS = 65_536             # rows past the index's coverage that the exact scan may carry before they are added
RETRAIN_GROWTH = 4             # rows past this multiple of the training size: train a new quantiser
TRAIN_PER_LIST = 64            # training sample rows per coarse centroid (faiss wants at least 39)
MAX_TRAIN_ROWS = 262_144       # a bigger sample costs k-means time and gains little recall
ADD_CHUNK = 65_536             # rows encoded at once (bounds memory)
DEFAULT_NPROBE_SHARE = 1 / 256  # lists scanned per query, as a share of nlist: 16 at 1M, 64 at 10M (bench/README.md: recall curve)
MIN_NPROBE = 8
LARGE_NLIST = 4096             # from this many lists: two-level k-means and an HNSW graph over the centroids
HNSW_NEIGHBOURS = 32
ANN_PATTERN = re.compile(r"\.ann\d+\.faiss$")


class AnnUnavailableError(UclipError):
    """The approximate index was asked for, but faiss is not installed."""


def faiss_module():
    """faiss, or AnnUnavailableError with the pip command."""
    # faiss's OpenMP threads wait for work by spinning, unless told otherwise before the library loads: on a
    # machine with other work (decoding threads, ONNX Runtime, other processes) they would take its cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError:
        from ..extras import missing_extra_message

        raise AnnUnavailableError(missing_extra_message("ann", "the approximate index", "faiss")) from None
    global _THREADS_SET
    if not _THREADS_SET:
        from ..threads import THREADS_ENV

        threads = os.environ.get(THREADS_ENV, "")
        if threads.isdigit() and int(threads) > 0:
            faiss.omp_set_num_threads(int(threads))   # the thread count the user gave uclip, as ONNX Runtime gets
        _THREADS_SET = True
    return faiss


_THREADS_SET = False


def faiss_available() -> bool:
    try:
        faiss_module()
    except AnnUnavailableError:
        return False
    return True


def ivf_shape(rows: int, d: int) -> tuple[int, int, int]:
    """(nlist, PQ sub-quantisers, bits per code) for an index of `rows` rows of dimension d.

    nlist: the power of two nearest 4 sqrt(rows) (faiss's guideline), at most rows / 39 so each centroid
    has training points. PQ: d/8 sub-quantisers (8 dimensions each: 64 bytes at d = 512) or the nearest
    divisor of d; 8 bits, fewer only for tiny indexes where 256 centroids per sub-space cannot be trained.
    """
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows))))
    nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, rows // 39)))))
    m = max(1, d // 8)
    while d % m:
        m -= 1
    bits = 8 if rows >= 39 * 256 else max(4, min(8, int(math.log2(max(16, rows // 4)))))
    return nlist, m, bits


def _digest(path: Path, start: int = 0, length: int | None = None, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            block = f.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


class AnnSearcher(VectorSearcher):
    """An opened ANN file: candidates for the rows it covers (search.py re-scores them)."""

    exact = False

    def __init__(self, path: Path, covered: int, nprobe: int, fd: int):
        self.covered = covered
        self.nprobe = nprobe
        self._path = path
        self._fd = fd                     # keeps the file a snapshot named, even once a writer replaces it
        self._index = None
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def warm(self) -> None:
        self._loaded()

    def _loaded(self):
        with self._lock:
            if self._index is None:
                faiss = faiss_module()
                source = f"/proc/self/fd/{self._fd}" if os.path.exists(f"/proc/self/fd/{self._fd}") else str(self._path)
                self._index = faiss.read_index(source, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            return self._index

    def search(self, query, k, *, mask=None, min_score=None, info=None, nprobe: int | None = None):
        """Up to k candidate rows (< covered) with their approximate scores, best first.

        `mask` travels into faiss as a bitmap of the rows it may return; `min_score` is left to the
        exact re-scoring (approximate scores prove nothing).
        """
        faiss = faiss_module()
        index = self._loaded()
        k = int(min(k, self.covered))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.nprobe))
        graph = None
        if isinstance(faiss.downcast_index(index.quantizer), faiss.IndexHNSW):
            graph = faiss.SearchParametersHNSW(efSearch=max(64, 2 * params.nprobe))   # must see nprobe lists
            params.quantizer_params = graph
        bitmap = selector = None
        if mask is not None:
            bitmap = np.packbits(np.asarray(mask[:self.covered], dtype=bool), bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            params.sel = selector
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        scores, rows = index.search(q, k, params=params)
        del selector, bitmap, graph          # faiss held bare pointers to these: alive until here
        rows, scores = rows[0], scores[0]
        keep = (rows >= 0) & (rows < self.covered)   # -1: fewer hits; others: a damaged list
        if info is not None:
            info.update(ann_candidates=int(keep.sum()), nprobe=params.nprobe)
        return rows[keep].astype(np.int64), scores[keep].astype(np.float32)


class AnnIndex(VectorIndex):
    kind = "ann"
    settings = {"ann_mode": MODES}

    @classmethod
    def check_setting(cls, key: str, value: str) -> None:
        if key == "ann_mode" and value == "on":
            faiss_module()

    # ---------------------------------------------------------------- meta

    @property
    def mode(self) -> str:
        mode = self.meta.get("ann_mode", "auto")
        return mode if mode in MODES else "auto"

    @property
    def file(self) -> str:
        """The ANN file of the live vectors, or "" (none, or one of a replaced generation)."""
        name = self.meta.get("ann_file", "")
        return name if name and self.meta.get("ann_vectors") == self.vectors_file else ""

    @property
    def covered(self) -> int:
        return int(self.meta.get("ann_rows", "0")) if self.file else 0

    @property
    def committed_rows(self) -> int:
        return self.covered

    def unbuilt(self) -> str:
        if self.mode == "off":
            why = "switched off (uclip index --ann off)"
        elif not faiss_available():
            why = "it needs the `ann` extra (FAISS)"
        elif self.mode == "auto":
            why = f"made from {AUTO_MIN_ROWS:,} photos (uclip index --ann on makes one now) and the index has {self.rows:,}"
        else:
            why = "the next `uclip index` makes one"
        return f"no approximate index: {why}; searches are exact"

    @property
    def trained(self) -> int:
        return int(self.meta.get("ann_trained", "0")) if self.file else 0

    def wanted(self, rows: int) -> bool:
        """Whether the setting wants an index over `rows` rows (and faiss is there to build one)."""
        if self.mode == "off" or rows == 0:
            return False
        return (self.mode == "on" or rows >= AUTO_MIN_ROWS) and faiss_available()

    def nprobe(self) -> int:
        nlist = int(self.meta.get("ann_nlist", "1"))
        return max(1, min(nlist, int(self.meta.get("ann_nprobe", "0")) or max(MIN_NPROBE, round(nlist * DEFAULT_NPROBE_SHARE))))

    # ---------------------------------------------------------------- files

    def files(self) -> set[str]:
        return {self.file} if self.file else set()

    @classmethod
    def claims(cls, name: str) -> bool:
        return bool(ANN_PATTERN.search(name))

    # ---------------------------------------------------------------- writer

    def add(self, vectors: np.ndarray) -> dict[str, str]:
        rows = len(vectors)
        if not self.wanted(rows):
            return self._dropped()
        if not self.file or rows > RETRAIN_GROWTH * max(self.trained, 1):
            return self._build(self.vectors_file, vectors)
        if rows - self.covered > TAIL_ROWS:
            return self._extend(vectors)
        return {}

    def rebuild(self, vectors_file: str, vectors: np.ndarray) -> dict[str, str]:
        if not self.wanted(len(vectors)):
            return self._dropped()
        return self._build(vectors_file, vectors)

    def verify(self, vectors: np.ndarray) -> int:
        """Rows covered when the file is whole (size, both digests) and faiss reads it; else 0."""
        if not self.file:
            return 0
        path = self.folder / self.file
        try:
            if path.stat().st_size != int(self.meta["ann_bytes"]) or _digest(path) != self.meta.get("ann_sum"):
                return 0
            faiss = faiss_module()
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except (OSError, KeyError, ValueError, RuntimeError, UclipError):
            return 0
        if index.ntotal != self.covered or index.d != vectors.shape[1] or self.covered > len(vectors):
            return 0
        return self.covered

    def repair(self, vectors: np.ndarray) -> dict[str, str]:
        if self.file and self.verify(vectors) == 0:
            changes = self.rebuild(self.vectors_file, vectors)   # a damaged file: build again (or drop)
            changes.setdefault("ann_file", "")
            return changes
        return self.add(vectors)

    # ---------------------------------------------------------------- reader

    def searcher(self, vectors: np.ndarray) -> AnnSearcher | None:
        """The committed file opened now, after the cheap checks (size, head digest); None when unusable."""
        if not self.file or self.covered <= 0 or self.covered > len(vectors):
            return None
        path = self.folder / self.file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size, head = int(self.meta["ann_bytes"]), int(self.meta["ann_head"])
            if os.fstat(fd).st_size != size or not 0 < head <= size:
                raise ValueError("size")
            if _digest(Path(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else path, 0, head) \
                    != self.meta.get("ann_head_sum"):
                raise ValueError("head")
        except (OSError, KeyError, ValueError):
            os.close(fd)
            return None
        return AnnSearcher(path, self.covered, self.nprobe(), fd)

    # ---------------------------------------------------------------- internals

    def _dropped(self) -> dict[str, str]:
        return {"ann_file": ""} if self.meta.get("ann_file") else {}

    def _next_name(self, vectors_file: str) -> tuple[str, int]:
        seq = int(self.meta.get("ann_seq", "0")) + 1
        return f"{vectors_file.removesuffix('.f32')}.ann{seq}.faiss", seq

    def _build(self, vectors_file: str, vectors: np.ndarray) -> dict[str, str]:
        """A new index trained on a sample of the rows, holding all of them."""
        faiss = faiss_module()
        rows, d = vectors.shape
        nlist, m, bits = ivf_shape(rows, d)
        sample = _sample(vectors, min(rows, max(nlist * TRAIN_PER_LIST, 256 * 39), MAX_TRAIN_ROWS))
        if nlist >= LARGE_NLIST:
            # k-means over all nlist centroids and assigning every row to its nearest of them (flat) cost
            # rows x nlist x d each: at 10M rows, hours on two cores. Two-level k-means (sqrt(nlist)
            # coarse clusters, each split) and an HNSW graph over the centroids cut both by ~sqrt(nlist).
            from faiss.contrib.clustering import two_level_clustering

            quantizer = faiss.IndexHNSWFlat(d, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
            centroids, _ = two_level_clustering(sample, int(math.sqrt(nlist)), nlist, seed=1234,
                                                min_points_per_centroid=1)
            quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
            index.pq.cp.min_points_per_centroid = 1
            index.pq.cp.seed = 1234
            index.train(sample)                          # the quantiser holds nlist centroids: trains the PQ only
        else:
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1          # small indexes: no warnings on stderr
            index.pq.cp.min_points_per_centroid = 1
            index.cp.seed = index.pq.cp.seed = 1234
            index.train(sample)
        _add_rows(index, vectors, 0, rows)
        return self._write(index, vectors_file, rows, trained=rows, nlist=nlist)

    def _extend(self, vectors: np.ndarray) -> dict[str, str]:
        """The committed index plus the rows past its coverage, written as a new file."""
        faiss = faiss_module()
        index = faiss.read_index(str(self.folder / self.file))
        start, rows = self.covered, len(vectors)
        _add_rows(index, vectors, start, rows)
        return self._write(index, self.vectors_file, rows, trained=self.trained, nlist=int(self.meta.get("ann_nlist", "1")))

    def _write(self, index, vectors_file: str, rows: int, *, trained: int, nlist: int) -> dict[str, str]:
        faiss = faiss_module()
        name, seq = self._next_name(vectors_file)
        path = self.folder / name
        try:
            faiss.write_index(index, str(path))
        except RuntimeError as e:                     # faiss reports a failed write as its own exception
            path.unlink(missing_ok=True)
            st = os.statvfs(self.folder)
            if st.f_bavail * st.f_frsize < (64 << 20):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise OSError(errno.EIO, f"faiss could not write it ({str(e).strip().splitlines()[-1]})", str(path)) from None
        fsync_path(path)
        fsync_path(self.folder)
        lists = faiss.extract_index_ivf(index).invlists
        data = sum(lists.list_size(i) for i in range(lists.nlist)) * (lists.code_size + 8)
        size = path.stat().st_size
        head = size - data
        return {
            "ann_file": name, "ann_vectors": vectors_file, "ann_rows": str(rows), "ann_trained": str(trained),
            "ann_nlist": str(nlist), "ann_seq": str(seq), "ann_bytes": str(size), "ann_head": str(head),
            "ann_head_sum": _digest(path, 0, head), "ann_sum": _digest(path),
        }


def _sample(vectors: np.ndarray, n: int) -> np.ndarray:
    """n distinct rows at random (sorted, so a memory map is read in order), float32."""
    rows = len(vectors)
    picks = np.sort(np.random.default_rng(rows).choice(rows, n, replace=False)) if n < rows else np.arange(rows)
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)


def _add_rows(index, vectors: np.ndarray, start: int, stop: int) -> None:
    for first in range(start, stop, ADD_CHUNK):
        last = min(stop, first + ADD_CHUNK)
        index.add_with_ids(np.ascontiguousarray(vectors[first:last], dtype=np.float32), np.arange(first, last, dtype=np.int64))

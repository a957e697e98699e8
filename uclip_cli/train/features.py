"""Feature files: float32 [N, d] `.npy` arrays, memory-mappable, written once and resumably.

Encoding is generic over an `encoder_fn(batch) -> np.ndarray` callable (the bundle's ONNX
encoders plug in here). Output is appended batch by batch to `<out>.partial` behind a reserved
header, with `<out>.progress.json` recording how far it got, so an interrupted extraction resumes
where it stopped; when done the header is filled in and the file is renamed to `<out>`.
`<out>.meta.json` records what was encoded (a key over the inputs and the encoder id): a second
call with the same inputs returns the cached file without encoding anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import ProgressEvent, ProgressFn
from .data import TrainInputError, check_feature_array

NPY_HEADER_BYTES = 128       # reserved in front of the rows of a partial file; a multiple of 64 as .npy wants
FEATURE_DTYPE = np.dtype("<f4")

EncoderFn = Callable[[Sequence], np.ndarray]


# ---------------------------------------------------------------- reading and writing whole files

def open_features(path: Path, *, dim: int | None = None, min_rows: int = 1, check: bool = True) -> np.ndarray:
    """Memory-map a float32 [N, d] .npy feature file; with check, refuse it with TrainInputError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise TrainInputError(f"{path}: feature file not found")
    if path.stat().st_size == 0:
        raise TrainInputError(f"{path}: empty file, not a .npy feature array")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TrainInputError(f"{path}: not a readable .npy feature array ({e})") from None
    if array.dtype != np.float32:
        raise TrainInputError(f"{path}: features must be float32, got {array.dtype}: save them with .astype('float32')")
    if check:
        check_feature_array(array, name=str(path), dim=dim, min_rows=min_rows)
    return array


def save_features(path: Path, array: np.ndarray) -> None:
    """Write a float32 [N, d] .npy file atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    os.replace(tmp, path)


# ---------------------------------------------------------------- resumable encoding

@dataclass(frozen=True)
class EncodeReport:
    path: Path
    rows: int              # feature rows in the file
    items: int             # inputs consumed
    skipped: int           # inputs the encoder returned no row for (images it could not decode)
    seconds: float         # time spent encoding in this call
    cached: bool           # the file already held these inputs: nothing was encoded
    resumed_from: int      # inputs already done by an interrupted earlier call


def _npy_header(rows: int, dim: int) -> bytes:
    body = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    size = NPY_HEADER_BYTES - 10
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + (body.ljust(size - 1) + "\n").encode("latin1")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def inputs_key(kind: str, items: Sequence[str], encoder_id: str) -> str:
    h = hashlib.sha256(f"{kind}\0{encoder_id}\0{len(items)}\0".encode())
    for item in items:
        h.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _checked_batch(vectors: np.ndarray, n_items: int, dim: int | None, exact: bool, out_path: Path) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.size == 0 and not exact:          # every input of the batch skipped
        return np.zeros((0, dim or 0), dtype=FEATURE_DTYPE)
    if vectors.ndim != 2 or (exact and vectors.shape[0] != n_items) or vectors.shape[0] > n_items:
        want = f"{n_items}" if exact else f"at most {n_items}"
        raise RuntimeError(f"{out_path}: the encoder returned shape {vectors.shape} for {n_items} inputs, expected {want} rows")
    if dim is not None and vectors.shape[0] and vectors.shape[1] != dim:
        raise RuntimeError(f"{out_path}: the encoder returned {vectors.shape[1]}-d rows after {dim}-d ones")
    if not np.isfinite(vectors).all():
        raise RuntimeError(f"{out_path}: the encoder returned NaN or infinite values")
    return np.ascontiguousarray(vectors, dtype=FEATURE_DTYPE)


def encode_to_file(items: Sequence, encoder_fn: EncoderFn, out_path: Path, *, key: str, batch: int,
                   exact_rows: bool, progress: ProgressFn | None = None, stage: str = "encode") -> EncodeReport:
    """Encode items batch by batch into a .npy feature file; cached by key, resumable after interruption.

    exact_rows: the encoder must return one row per input (captions: row i is caption i); otherwise
    it may return fewer (inputs it could not encode are dropped; fine for an unordered memory).
    """
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    marker_path = out_path.with_name(out_path.name + ".progress.json")
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    n = len(items)

    meta = _read_json(meta_path)
    if out_path.is_file() and meta and meta.get("key") == key:
        return EncodeReport(out_path, meta["rows"], n, meta["skipped"], 0.0, True, n)

    marker = _read_json(marker_path)
    resume = partial.is_file() and marker is not None and marker.get("key") == key
    done, rows, dim = (marker["items_done"], marker["rows"], marker["dim"]) if resume else (0, 0, None)
    resumed_from = done
    started = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "r+b" if resume else "w+b") as f:
        if resume:
            f.truncate(NPY_HEADER_BYTES + rows * (dim or 0) * FEATURE_DTYPE.itemsize)
            f.seek(0, os.SEEK_END)
        else:
            f.write(b"\0" * NPY_HEADER_BYTES)
        for start in range(done, n, batch):
            chunk = items[start:start + batch]
            vectors = _checked_batch(encoder_fn(chunk), len(chunk), dim, exact_rows, out_path)
            if vectors.shape[0]:
                dim = vectors.shape[1]
                f.write(vectors.tobytes())
            f.flush()
            os.fsync(f.fileno())          # rows on disk before the marker says they are
            rows, done = rows + vectors.shape[0], start + len(chunk)
            _write_json(marker_path, {"key": key, "items_done": done, "rows": rows, "dim": dim})
            if progress:
                rate = (done - resumed_from) / max(time.perf_counter() - started, 1e-9)
                progress(ProgressEvent(stage, done, n, rate, "items"))
        if rows == 0 or dim is None:
            raise TrainInputError(f"{out_path}: none of the {n} inputs could be encoded")
        f.seek(0)
        f.write(_npy_header(rows, dim))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, out_path)
    _write_json(meta_path, {"key": key, "rows": rows, "dim": dim, "skipped": done - rows})
    marker_path.unlink(missing_ok=True)
    return EncodeReport(out_path, rows, n, n - rows, time.perf_counter() - started, False, resumed_from)


def encode_texts_to_file(texts: Sequence[str], encoder_fn: Callable[[list[str]], np.ndarray], out_path: Path, *,
                         batch: int = 256, encoder_id: str = "", progress: ProgressFn | None = None,
                         stage: str = "encode_text") -> EncodeReport:
    """Row i of the file is encoder_fn's embedding of texts[i] (the encoder must return one row per text).

    encoder_id names the encoder (e.g. the sha256 of its ONNX file) so that another encoder does not reuse the cache.
    """
    key = inputs_key("text", list(texts), encoder_id)
    return encode_to_file(list(texts), encoder_fn, out_path, key=key, batch=batch, exact_rows=True,
                          progress=progress, stage=stage)


def encode_images_to_file(paths: Sequence[str | os.PathLike], encoder_fn: Callable[[list[Path]], np.ndarray],
                          out_path: Path, *, batch: int = 64, encoder_id: str = "",
                          progress: ProgressFn | None = None) -> EncodeReport:
    """Image memory features: encoder_fn returns rows for the images it could decode (skipped ones dropped).

    The cache key covers each path with its size and mtime, so a changed image is encoded again.
    """
    paths = [Path(p) for p in paths]
    key = inputs_key("image", [_file_signature(p) for p in paths], encoder_id)
    return encode_to_file(paths, encoder_fn, out_path, key=key, batch=batch, exact_rows=False,
                          progress=progress, stage="encode_image")


def _file_signature(path: Path) -> str:
    try:
        st = path.stat()
        return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        return f"{path}\0missing"

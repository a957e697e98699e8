"""Embedding shards: the Parquet files `uclip embed` writes and `uclip index --import` merges.

One shard holds one row per file of one partition of the input, in the partition's order:

    path          string     the file (a local path, or a filesystem URI such as s3://bucket/key)
    root          string     the folder it was listed under (the index's `root` of the record)
    size          int64      bytes, as listed
    mtime_ns      int64      modification time, as listed
    content_hash  string     blake2b-128 of the bytes read (null when the file could not be read)
    status        string     "ok" | "error"
    reason        string     why the file was skipped (null when ok): the same words `uclip index` records
    features      fixed_size_list<float32>[d_clip]     frozen image features, L2-normalised (null when error)
    vectors       fixed_size_list<float32>[d_search]   Head_B search vectors: only when the bundle has heads

and, as schema metadata, `uclip.shard` = JSON {format, image_fingerprint, heads_fingerprint, d_clip,
d_search, bundle}: an import refuses shards of another image encoder, and re-projects (no decoding)
shards whose heads differ from the bundle's.

A shard is written whole or not at all: into a hidden temporary file beside it, fsynced, renamed into
place, and the folder fsynced. A shard file that exists is finished; a crashed writer leaves only a
temporary file, which the next run ignores and overwrites. Needs pyarrow (the `ray` extra).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UclipError
from .filecache import fsync_path

FORMAT = 1
METADATA_KEY = b"uclip.shard"
SHARD_GLOB = "shard-*.parquet"


class ShardError(UclipError):
    """A shard that cannot be written or imported as asked."""


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        from .extras import install_command

        raise ShardError(f"Parquet shards need pyarrow: {install_command('ray')}") from None
    return pyarrow


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    image_fingerprint: str
    heads_fingerprint: str
    d_clip: int
    d_search: int
    bundle: str

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **self.__dict__})


@dataclass
class ShardRows:
    """One shard in memory: per-file columns, and features/vectors for the rows with status ok (in order)."""

    path: list[str]
    root: list[str]
    size: list[int]
    mtime_ns: list[int]
    content_hash: list[str | None]
    status: list[str]
    reason: list[str | None]
    features: np.ndarray            # [n_ok, d_clip]
    vectors: np.ndarray | None      # [n_ok, d_search] or None


def write_shard(path: Path, rows: ShardRows, info: ShardInfo) -> None:
    """Write one shard atomically (tmp, fsync, rename, fsync the folder)."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    ok = np.asarray([s == "ok" for s in rows.status], dtype=bool)
    columns = {
        "path": pa.array(rows.path, pa.string()), "root": pa.array(rows.root, pa.string()),
        "size": pa.array(rows.size, pa.int64()), "mtime_ns": pa.array(rows.mtime_ns, pa.int64()),
        "content_hash": pa.array(rows.content_hash, pa.string()), "status": pa.array(rows.status, pa.string()),
        "reason": pa.array(rows.reason, pa.string()),
        "features": _vector_column(pa, rows.features, ok, info.d_clip),
    }
    if rows.vectors is not None:
        columns["vectors"] = _vector_column(pa, rows.vectors, ok, info.d_search)
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: info.to_json().encode()})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _vector_column(pa, vectors: np.ndarray, ok: np.ndarray, dim: int):
    """fixed_size_list<float32>[dim] with a row of `vectors` for each ok row (in order) and null elsewhere."""
    full = np.zeros((len(ok), dim), dtype=np.float32)
    if ok.any():
        full[ok] = vectors
    values = pa.array(full.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~ok))


def shard_files(arguments: list[str | os.PathLike]) -> list[Path]:
    """Shard files named directly, or found in folders (shard-*.parquet), each once, in name order per folder."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            inside = sorted(path.glob(SHARD_GLOB))
            if not inside:
                raise ShardError(f"{path}: no {SHARD_GLOB} files in this folder: pass the output folder of `uclip embed`")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise ShardError(f"{path}: no such shard file or folder")
    return list(dict.fromkeys(p.resolve() for p in found))


def read_shard(path: Path) -> tuple[ShardInfo, ShardRows]:
    """One shard, checked: its metadata, columns and vector widths; ShardError naming the file otherwise."""
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
        info = ShardInfo(str(meta["image_fingerprint"]), str(meta["heads_fingerprint"]), int(meta["d_clip"]),
                         int(meta["d_search"]), str(meta.get("bundle", "")))
        if int(meta["format"]) != FORMAT:
            raise ValueError(f"shard format {meta['format']}, this uclip reads {FORMAT}")
        columns = {name: table.column(name).to_pylist() for name in
                   ("path", "root", "size", "mtime_ns", "content_hash", "status", "reason")}
        ok = np.asarray([s == "ok" for s in columns["status"]], dtype=bool)
        features = _vectors(table, "features", ok, info.d_clip)
        vectors = _vectors(table, "vectors", ok, info.d_search) if "vectors" in table.column_names else None
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: not a shard written by `uclip embed` ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors (ArrowInvalid, ...) for a damaged file
        raise ShardError(f"{path}: not a readable Parquet shard ({type(e).__name__}: {e})") from None
    if not set(columns["status"]) <= {"ok", "error"}:
        raise ShardError(f"{path}: unknown status values {sorted(set(columns['status']) - {'ok', 'error'})}")
    return info, ShardRows(**columns, features=features, vectors=vectors)


def _vectors(table, name: str, ok: np.ndarray, dim: int) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if column.type.list_size != dim:
        raise ValueError(f"{name} are {column.type.list_size}-d, the metadata says {dim}")
    if column.null_count != int((~ok).sum()) or not np.array_equal(~np.asarray(column.is_null()), ok):
        raise ValueError(f"{name} missing for some ok rows or present for failed ones")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(-1, dim)


def read_skipped(path: Path) -> list[dict]:
    """The failed rows of a shard (path, reason, size) without reading its vectors."""
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", "status", "reason", "size"])
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
        raise ShardError(f"{path}: not a readable Parquet shard ({type(e).__name__}: {e})") from None
    return [{"path": p, "reason": r, "size": s} for p, st, r, s in
            zip(*(table.column(c).to_pylist() for c in ("path", "status", "reason", "size"))) if st == "error"]


def iter_shards(paths: list[Path]) -> Iterator[tuple[Path, ShardInfo, ShardRows]]:
    for path in paths:
        info, rows = read_shard(path)
        yield path, info, rows

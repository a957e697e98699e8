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

A shard is outside data to `uclip index --import` (it may come from another machine, another user, a
disk that rots): `row_problems` checks each row as `uclip index` checks a file before it is committed.
Features (and the vectors used as they are) must be finite and of unit length within the tolerance
`uclip check` applies to stored rows (exact.UNIT_TOLERANCE): uclip L2-normalises both, so a row x3, 1e30,
all zero or with a flipped exponent is damage, not data. An ok row needs a well-formed content hash (the
catalogue's identity of the content); a path must be absolute, normalised and inside its root, and the
root must not be the filesystem's root: the import records the root, and the next plain `uclip index`
walks every recorded root. A bad row is skipped with its reason (never a traceback, never a silent
acceptance); the rows around it still land. Flipped bytes that keep a row finite and unit are caught
where they can be: shards are written with Parquet page checksums (CRC-32 of each data page), verified
when read, so a flipped byte in a page is a damaged shard refused in one line.
"""
from __future__ import annotations

import json
import os
import re
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
    pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
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


def is_whole(path: Path, rows: int) -> bool:
    """The shard's footer reads and says `rows` rows and uclip's metadata: a cheap check (one read at the
    end of the file) that catches a shard cut short, which loses its footer, without reading its pages."""
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        return meta.num_rows == rows and METADATA_KEY in (meta.metadata or {})
    except Exception:  # noqa: BLE001 - pyarrow's errors for a damaged file: not whole
        return False


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
        table = pq.read_table(path, page_checksum_verification=True)
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
        raise ShardError(f"{path}: not a shard written by `uclip embed` ({type(e).__name__}: {_one_line(e)}): "
                         "damaged or not a shard; embed its files again") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors (ArrowInvalid, ...) for a damaged file
        raise ShardError(f"{path}: not a readable Parquet shard ({type(e).__name__}: {_one_line(e)}): "
                         "damaged; embed its files again") from None
    if not set(columns["status"]) <= {"ok", "error"}:
        raise ShardError(f"{path}: unknown status values {sorted(set(columns['status']) - {'ok', 'error'})}")
    return info, ShardRows(**columns, features=features, vectors=vectors)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """pyarrow's message, which may span lines (a thrift error ends in one), as one line."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _vectors(table, name: str, ok: np.ndarray, dim: int) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if column.type.list_size != dim:
        raise ValueError(f"{name} are {column.type.list_size}-d, the metadata says {dim}")
    if column.null_count != int((~ok).sum()) or not np.array_equal(~np.asarray(column.is_null()), ok):
        raise ValueError(f"{name} missing for some ok rows or present for failed ones")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(-1, dim)


CONTENT_HASH = re.compile(r"[0-9a-f]{32}")   # blake2b-128, hex (image_pipeline.content_hash)


def row_problems(rows: ShardRows, *, check_vectors: bool) -> dict[int, str]:
    """Row number -> why the row cannot be imported, for every row that is not what `uclip embed` writes.

    check_vectors: the shard's own vectors will be stored as they are (its heads are the bundle's); vectors
    that will be re-projected from the features are not data the import keeps, and are not judged."""
    from .index.exact import UNIT_TOLERANCE

    problems: dict[int, str] = {}
    ok_rows = [i for i, status in enumerate(rows.status) if status == "ok"]
    for name, values in (("features", rows.features), ("vectors", rows.vectors if check_vectors else None)):
        if values is None or not len(values):
            continue
        finite = np.isfinite(values).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(values), values, 0).astype(np.float64), axis=1)
        for k in np.flatnonzero(~finite | ~(np.abs(norms - 1.0) <= UNIT_TOLERANCE)):
            problems.setdefault(ok_rows[k], f"{name} not finite (NaN or infinity)" if not finite[k] else
                                f"{name} not of unit length (norm {norms[k]:.4g}; uclip writes 1): damaged or not "
                                "written by `uclip embed`")
    for i, path in enumerate(rows.path):
        reason = _file_problem(path, rows.root[i], rows.size[i], rows.mtime_ns[i])
        digest = rows.content_hash[i]
        if reason is None and rows.status[i] == "ok" and digest is None:
            reason = "no content hash for an embedded file"
        elif reason is None and digest is not None and not (isinstance(digest, str) and CONTENT_HASH.fullmatch(digest)):
            reason = f"content hash {str(digest)[:40]!r} is not a blake2b-128 in lower-case hex"
        if reason is not None:
            problems[i] = reason
    return dict(sorted(problems.items()))


def _file_problem(path, root, size, mtime_ns) -> str | None:
    """Why a row's path, root, size or mtime cannot be a file `uclip embed` listed; None when they can."""
    if not isinstance(path, str) or not isinstance(root, str) or not path or not root or "\0" in path + root:
        return "no path or no root"
    if not isinstance(size, int) or size < 0 or not isinstance(mtime_ns, int):
        return f"size {size!r} or mtime {mtime_ns!r} is not a file's"
    scheme, sep, rest = root.partition("://")
    if sep and scheme.isidentifier() and scheme != "file":         # a remote folder (s3://bucket/photos)
        inside = rest.strip("/")
        if not inside:
            return f"root {root} is a whole filesystem, not a folder the user named"
        path_scheme, _, path_rest = path.partition("://")
        within = path_scheme == scheme and path_rest.lstrip("/").startswith(inside + "/")
        return None if within and "/../" not in path_rest + "/" else f"{path} is not inside its root {root}"
    if not (os.path.isabs(root) and os.path.isabs(path)):
        return f"path or root is not absolute ({root})"
    if os.path.normpath(root) != (root.rstrip(os.sep) or os.sep) or os.path.normpath(path) != path:
        return "path or root is not normalised (holds . or .. or //)"
    if Path(root).parent == Path(root):
        return (f"root {root} is the whole filesystem: the next plain `uclip index` would walk all of it; "
                "embed the photo folder itself")
    if not Path(path).is_relative_to(root) or Path(path) == Path(root):
        return f"{path} is not inside its root {root}"
    return None


def read_skipped(path: Path) -> list[dict]:
    """The failed rows of a shard (path, reason, size) without reading its vectors."""
    require_pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", "status", "reason", "size"])
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
        raise ShardError(f"{path}: not a readable Parquet shard ({type(e).__name__}: {_one_line(e)})") from None
    return [{"path": p, "reason": r, "size": s} for p, st, r, s in
            zip(*(table.column(c).to_pylist() for c in ("path", "status", "reason", "size"))) if st == "error"]


def iter_shards(paths: list[Path]) -> Iterator[tuple[Path, ShardInfo, ShardRows]]:
    for path in paths:
        info, rows = read_shard(path)
        yield path, info, rows

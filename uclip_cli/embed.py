"""`uclip embed`: the image pipeline on Ray Data, into Parquet shards that `uclip index --import` merges.

The shape is clip-retrieval's reader -> mapper -> writer, with Ray Data as the distributor:

- plan (driver): list the inputs (folders walked as `uclip index` walks them, file lists, or a folder on
  a pyarrow / fsspec filesystem such as s3://bucket/photos) and cut the files, in listing order, into
  partitions of `shard_size`. The plan is kept in OUT/plan.jsonl (written atomically): a rerun reuses it,
  adds files listed since as new partitions, and skips every partition whose shard file exists.
- decode (CPU tasks): `map_batches(_decode_shard)`, one partition per call: read + hash + decode + resize
  with the same `pipeline.Preparer` as `uclip index`; pixels travel as uint8 (a quarter of float32).
- encode + write (an actor pool): `map_batches(_EncodeShards)`, one ONNX Runtime session per actor
  (`num_gpus=1` actors where the cluster has GPUs, with TensorRT > CUDA > CPU, whichever loads; CPU
  actors otherwise); each partition is normalised exactly as `images.preprocess` does, encoded in
  batches (features, and Head_B vectors when the bundle has heads), and written as one shard
  (`shards.write_shard`: tmp + fsync + rename).
- driver: iterates the small per-shard results for progress, then prints a summary and writes
  OUT/report.json (every skipped file and why) as `uclip index` does. The user's terminal shows uclip's
  lines only: Ray's own log lines go to Ray's session logs and OUT/ray-driver.log (`_quiet_ray`,
  `_native_stderr_to`), and a failed task or actor is one line naming its exception (`_worker_failure`).

Fault tolerance: Ray retries a decode task whose worker dies (Ray's default: 3 retries on a system
failure) and Ray Data restarts a dead actor and retries its partition (its default: without limit); a partition's shard is a pure function of its files, so a retried or repeated partition
writes the same shard, and a shard file appears whole or not at all. A killed driver loses nothing:
the rerun skips finished shards. A finished shard found damaged later (cut short by a copy, a full disk,
a bad disk: its footer does not read or does not hold its partition's rows) is moved aside as
`shard-N.parquet.damaged` and its partition embedded again, with a note: that is safe because the shard
is a pure function of its partition's files, and nothing readable is lost (the damaged file could not
be imported, and it is kept for inspection). Only the footer is read (one small read per shard), so a
rerun over thousands of shards stays cheap; damage inside a page is caught by its checksum on import. Ray is imported here and nowhere else (the `ray` extra).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .bundle import Bundle, ImageSettings, load_bundle
from .errors import UclipError
from .filecache import fsync_path
from .image_pipeline import ListedFile, Preparer, prepare_in_threads, stat_files
from .progress import Progress
from .shards import ShardInfo, ShardRows, is_whole, read_skipped, require_pyarrow, shard_name, write_shard
from .walk import WalkWarning, is_image_name, walk_images

PLAN = "plan.jsonl"
JOB = "embed.json"
REPORT = "report.json"
DEFAULT_SHARD_SIZE = 512
RAY_LOG = "ray-driver.log"  # in OUT: what Ray's C++ side of the driver wrote to stderr in the last run
DECODE_THREADS = 2          # per decode task: overlaps reading (network filesystems) with decoding


class EmbedError(UclipError):
    """An embedding job that cannot run as asked."""


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        from .extras import install_command

        raise EmbedError(f"`uclip embed` runs on Ray: {install_command('ray')}") from None
    require_pyarrow()
    return ray


@dataclass
class EmbedOptions:
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 32
    device: str = "auto"
    threads: int | None = None          # ONNX Runtime threads per encoder actor (CPU)
    actors: int | None = None           # encoder actors (default: one per GPU, else one per 4 CPUs)
    ray_address: str | None = None      # None: this machine (ray.init() starts a local Ray)
    files: list[Path] = field(default_factory=list)   # text files listing image paths, one per line
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    follow_links: bool = False
    progress: bool = True


@dataclass
class EmbedSummary:
    out_dir: Path
    files: int = 0              # files in the plan
    shards: int = 0             # shards in the plan
    done_before: int = 0        # shards already finished before this run
    written: int = 0            # shards written by this run
    embedded: int = 0           # files embedded by this run
    failed: int = 0             # files skipped by this run
    seconds: float = 0.0
    ray_start_seconds: float = 0.0   # of `seconds`: starting or reaching Ray
    providers: list[str] = field(default_factory=list)
    walk_warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None
    skipped_in_all: int = 0

    def format(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        lines = [f"embedded {self.embedded + self.failed} files in {self.seconds:.1f} s: {self.embedded} embedded "
                 f"({rate:.1f} images/s on {', '.join(self.providers) or 'no encoder'}), {self.failed} skipped; "
                 f"{self.written} shards written, {self.done_before} already done (Ray start {self.ray_start_seconds:.1f} s)",
                 f"shards {self.out_dir}: {self.shards} shards for {self.files} files, {self.skipped_in_all} files skipped in all"]
        lines.extend(f"warning: {w}" for w in self.walk_warnings)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ listing


def is_uri(text: str) -> bool:
    """A filesystem URI other than a local path (s3://, gs://, hdfs://, memory://, ...; file:// is local)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def list_inputs(inputs: list[str], options: EmbedOptions, warnings: list[WalkWarning]) -> list[ListedFile]:
    """Every input file, in order: local folders walked like `uclip index`, URIs listed on their filesystem,
    and the paths named in file lists; each path once."""
    listed: list[ListedFile] = []
    local = [str(i).removeprefix("file://") for i in inputs if not is_uri(str(i))]
    if local:
        roots = [Path(r).expanduser().resolve() for r in local]
        listed += [ListedFile(e.path, e.root, e.size, e.mtime_ns, e.skip) for e in walk_images(
            local, exclude=options.exclude, include_hidden=options.include_hidden, warnings=warnings,
            follow_links=options.follow_links, indexed_roots=roots)]
    for uri in (str(i) for i in inputs if is_uri(str(i))):
        listed += list_uri(uri, include_hidden=options.include_hidden)
    for list_file in options.files:
        listed += stat_files(read_file_list(list_file))
    seen: set[str] = set()
    unique = []
    for entry in listed:
        if str(entry.path) not in seen:
            seen.add(str(entry.path))
            unique.append(entry)
    return unique


def read_file_list(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EmbedError(f"{path}: cannot read the file list ({e}): give a UTF-8 text file, one image path per line") from None
    return [line for line in text.splitlines() if line.strip()]


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI: pyarrow's own (s3, gs, hdfs, abfs) or any fsspec one."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - pyarrow does not know the scheme: try fsspec
        pass
    try:
        import fsspec
    except ImportError:
        raise EmbedError(f"{uri}: pyarrow has no filesystem for this scheme, and fsspec is not installed: "
                         "pip install fsspec (and the scheme's package, e.g. gcsfs)") from None
    scheme, _, rest = uri.partition("://")
    try:
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme))), rest
    except Exception as e:  # noqa: BLE001 - an unknown or unconfigured scheme
        raise EmbedError(f"{uri}: no filesystem for {scheme}:// ({e})") from None


def list_uri(uri: str, *, include_hidden: bool = False) -> list[ListedFile]:
    """The image files under a folder URI, sorted, with their sizes and mtimes; root = the URI."""
    from pyarrow import fs as pafs

    fs, base = filesystem(uri)
    scheme = uri.partition("://")[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except Exception as e:  # noqa: BLE001 - missing bucket, no credentials, ...
        raise EmbedError(f"{uri}: cannot be listed ({type(e).__name__}: {e})") from None
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        relative = info.path[len(base.rstrip("/")):].lstrip("/")
        if info.type != pafs.FileType.File or not is_image_name(info.base_name):
            continue
        if not include_hidden and any(part.startswith(".") for part in relative.split("/")):
            continue
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        out.append(ListedFile(f"{scheme}://{info.path.lstrip('/')}" if scheme != "memory" else f"memory://{info.path}",
                              uri, int(info.size or 0), int(mtime)))
    return out


@dataclass(frozen=True)
class RemoteReader:
    """Bytes of a file on a URI filesystem, capped like images.read_image_bytes (picklable: opens lazily)."""

    def __call__(self, uri: str) -> bytes:
        from .images import ImageDecodeError, byte_cap

        fs, path = filesystem(uri)
        cap = byte_cap(None)
        try:
            with fs.open_input_stream(path) as f:
                data = f.read(cap + 1)
        except Exception as e:  # noqa: BLE001 - any failure to read is a property of this file
            raise ImageDecodeError(uri, "unreadable", f"unreadable: {type(e).__name__}: {e}") from None
        if len(data) > cap:
            raise ImageDecodeError(uri, "too_large", f"file too large: more than {cap} bytes")
        return data


# ------------------------------------------------------------------------------------------ plan


def load_plan(out_dir: Path) -> list[list[list]]:
    """The partitions recorded so far: each a list of [path, root, size, mtime_ns, skip]."""
    path = out_dir / PLAN
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        shards = [json.loads(line) for line in lines if line.strip()]
        if [s["shard"] for s in shards] != list(range(len(shards))):
            raise ValueError("shards out of order")
        return [s["files"] for s in shards]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmbedError(f"{path} is damaged ({e}): embed into a new --out folder") from None


def extend_plan(out_dir: Path, planned: list[list[list]], listed: list[ListedFile], shard_size: int) -> list[list[list]]:
    """The plan with the listed files it does not hold yet appended as new partitions (written atomically)."""
    known = {f[0] for shard in planned for f in shard}
    new = [[str(e.path), str(e.root), int(e.size), int(e.mtime_ns), getattr(e, "skip", None)]
           for e in listed if str(e.path) not in known]
    if not new:
        return planned
    plan = planned + [new[i:i + shard_size] for i in range(0, len(new), shard_size)]
    tmp = out_dir / f".{PLAN}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, files in enumerate(plan):
            f.write(json.dumps({"shard": i, "files": files}, ensure_ascii=False) + "\n")
    fsync_path(tmp)
    os.replace(tmp, out_dir / PLAN)
    fsync_path(out_dir)
    return plan


def _check_job(out_dir: Path, bundle: Bundle) -> None:
    """OUT holds shards of one image encoder only; the first run records which."""
    job = {"image_fingerprint": bundle.image_fingerprint, "heads_fingerprint": bundle.heads_fingerprint}
    path = out_dir / JOB
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EmbedError(f"{path} is damaged ({e}): embed into a new --out folder") from None
        if recorded.get("image_fingerprint") != job["image_fingerprint"] or \
                recorded.get("heads_fingerprint") != job["heads_fingerprint"]:
            raise EmbedError(f"{out_dir} holds shards of another bundle ({recorded.get('image_fingerprint')}): "
                             "embed into a new --out folder")
        return
    tmp = out_dir / f".{JOB}.tmp"
    tmp.write_text(json.dumps(job) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the Ray stages


def _decode_shard(batch: dict, *, settings: dict) -> dict:
    """Ray Data task: each row's partition read + hashed + decoded + resized (uint8); metadata as JSON."""
    image = ImageSettings.from_dict(settings)
    out: dict[str, list] = {"shard": [], "meta": [], "pixels": []}
    for shard, files_json in zip(batch["shard"], batch["files"]):
        files = json.loads(files_json)
        entries = [ListedFile(p if is_uri(p) else Path(p), r if is_uri(r) else Path(r), s, m, skip)
                   for p, r, s, m, skip in files]
        preparer = Preparer(image, uint8=True, read=RemoteReader() if any(is_uri(f[0]) for f in files) else None)
        meta, pixels = [], []
        for item in prepare_in_threads(preparer, entries, workers=DECODE_THREADS):
            meta.append([item.content_hash, "error" if item.error is not None else "ok", item.error])
            if item.pixels is not None:
                pixels.append(item.pixels)
        stacked = np.stack(pixels) if pixels else np.zeros((0, 0, 0, 3), np.uint8)
        out["shard"].append(int(shard))
        out["meta"].append(json.dumps({"files": files, "results": meta, "shape": list(stacked.shape)}))
        out["pixels"].append(stacked.tobytes())
    return {"shard": np.asarray(out["shard"], np.int64), "meta": np.asarray(out["meta"], dtype=object),
            "pixels": np.asarray(out["pixels"], dtype=object)}


class _EncodeShards:
    """Ray Data actor: one ONNX Runtime session; encodes each partition and writes its shard."""

    def __init__(self, bundle_path: str, out_dir: str, device: str, threads: int | None, batch_size: int):
        from .encoders import Encoders
        from .sessions import SessionFactory

        self.bundle = load_bundle(Path(bundle_path))
        self.encoders = Encoders(self.bundle, SessionFactory(device=device, threads=threads))
        self.out_dir, self.batch_size = Path(out_dir), batch_size
        self.info = ShardInfo(self.bundle.image_fingerprint, self.bundle.heads_fingerprint, self.bundle.dims["clip"],
                              self.encoders.search_dim, str(self.bundle.path))

    def __call__(self, batch: dict) -> dict:
        from .images import normalise

        out: dict[str, list] = {"shard": [], "embedded": [], "failed": [], "provider": []}
        for shard, meta_json, blob in zip(batch["shard"], batch["meta"], batch["pixels"]):
            meta = json.loads(meta_json)
            pixels = np.frombuffer(blob, dtype=np.uint8).reshape(meta["shape"])
            features, vectors = [], []
            for start in range(0, len(pixels), self.batch_size):
                f = self.encoders.image_features(normalise(pixels[start:start + self.batch_size], self.bundle.image))
                features.append(f)
                vectors.append(self.encoders.project_image(f))
            d_clip = self.info.d_clip
            files, results = meta["files"], meta["results"]
            rows = ShardRows(
                path=[f[0] for f in files], root=[f[1] for f in files], size=[f[2] for f in files],
                mtime_ns=[f[3] for f in files], content_hash=[r[0] for r in results], status=[r[1] for r in results],
                reason=[r[2] for r in results],
                features=np.concatenate(features) if features else np.zeros((0, d_clip), np.float32),
                vectors=(np.concatenate(vectors) if vectors else np.zeros((0, self.info.d_search), np.float32))
                if self.bundle.has_heads else None)
            write_shard(self.out_dir / shard_name(int(shard)), rows, self.info)
            ok = sum(r[1] == "ok" for r in results)
            out["shard"].append(int(shard))
            out["embedded"].append(ok)
            out["failed"].append(len(results) - ok)
            providers = {m[0] for m in self.encoders.loaded_providers().values()}
            out["provider"].append(",".join(sorted(providers)))
        return {"shard": np.asarray(out["shard"], np.int64), "embedded": np.asarray(out["embedded"], np.int64),
                "failed": np.asarray(out["failed"], np.int64), "provider": np.asarray(out["provider"], dtype=object)}


# ------------------------------------------------------------------------------------------ driver


def run_embed(inputs: list[str], out_dir: Path, bundle_path: Path, options: EmbedOptions | None = None, *,
              log: Callable[[str], None] = lambda m: None) -> EmbedSummary:
    options = options or EmbedOptions()
    if options.shard_size < 1 or options.batch_size < 1:
        raise EmbedError("--shard-size and --batch-size must be at least 1")
    if not inputs and not options.files:
        raise EmbedError("nothing to embed: give folders (or URIs) of images, or --files LIST")
    for item in inputs:
        if not str(item).strip():
            raise EmbedError("an empty path was given as a folder: give the folder of photos")
    ray = require_ray()
    started = time.monotonic()
    bundle = load_bundle(Path(bundle_path))
    out_dir = Path(out_dir).expanduser().resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EmbedError(f"cannot create {out_dir} ({e.strerror}): pass another --out") from None
    _check_job(out_dir, bundle)
    warnings: list[WalkWarning] = []
    plan = extend_plan(out_dir, load_plan(out_dir), list_inputs([str(i) for i in inputs], options, warnings),
                       options.shard_size)
    summary = EmbedSummary(out_dir, files=sum(map(len, plan)), shards=len(plan),
                           walk_warnings=[str(w) for w in warnings])
    set_aside_damaged_shards(out_dir, plan, log)
    todo = [i for i in range(len(plan)) if not (out_dir / shard_name(i)).exists()]
    summary.done_before = len(plan) - len(todo)
    if todo:
        with _native_stderr_to(out_dir / RAY_LOG):
            _run_on_ray(ray, plan, todo, bundle, out_dir, options, summary, log)
    summary.seconds = time.monotonic() - started
    summary.report_path, summary.skipped_in_all = write_embed_report(out_dir, len(plan))
    return summary


def set_aside_damaged_shards(out_dir: Path, plan: list[list[list]], log: Callable[[str], None]) -> list[Path]:
    """Move each finished shard that is not whole (shards.is_whole) to NAME.damaged, so that it is embedded again."""
    moved = []
    for i, files in enumerate(plan):
        path = out_dir / shard_name(i)
        if path.exists() and not is_whole(path, len(files)):
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            moved.append(aside)
            log(f"note: {path} is damaged (cut short?): moved aside to {aside.name}; its {len(files)} files "
                "are embedded again")
    return moved


def _run_on_ray(ray, plan: list[list[list]], todo: list[int], bundle: Bundle, out_dir: Path, options: EmbedOptions,
                summary: EmbedSummary, log: Callable[[str], None]) -> None:
    ray_started = time.monotonic()
    _start_ray(ray, options, log)
    summary.ray_start_seconds = time.monotonic() - ray_started
    progress = Progress("embedding", sum(len(plan[i]) for i in todo), enabled=options.progress)
    providers: set[str] = set()
    try:
        for row in _dataset(ray, plan, todo, bundle, out_dir, options).iter_rows():
            summary.written += 1
            summary.embedded += int(row["embedded"])
            summary.failed += int(row["failed"])
            providers.update(p for p in str(row["provider"]).split(",") if p)
            progress.advance(int(row["embedded"]) + int(row["failed"]))
    except ray.exceptions.RayError as e:   # Ray Data's UserCodeException is one too
        raise _worker_failure(e, out_dir / RAY_LOG) from None
    finally:
        progress.close()
    summary.providers = sorted(providers)


def _quiet_ray() -> None:
    """Keep Ray's Python log lines off the user's terminal: the user sees uclip's progress and summary.

    They still go to Ray's session logs (/tmp/ray/session_latest/logs; Ray Data's under ray-data/), and a
    failure still reaches the user, as one line (`_worker_failure`). Ray's loggers: warnings and below dropped
    (a local start's token-authentication notice); Ray Data's console handler: silenced (its INFO lines on each
    execution; a failing task's traceback, which `_worker_failure` shortens), its file handler keeps everything.
    """
    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)


@contextmanager
def _native_stderr_to(path: Path) -> Iterator[None]:
    """Native code's writes to file descriptor 2 go to `path`; Python's sys.stderr keeps the user's terminal.

    Ray's C++ core worker in this driver copies each of its ERROR lines to stderr, and a healthy run has one
    ("Actor ... has constructor arguments in the object store and max_restarts > 0", about Ray Data's own
    actors). RAY_BACKEND_LOG_LEVEL=fatal would hide it, but it prints a line of its own and mutes the Ray
    daemons' log files too. So while Ray runs here, fd 2 is OUT/ray-driver.log and sys.stderr writes to a
    copy of the original descriptor.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no stderr to keep apart
        yield
        return
    try:
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError:
        os.close(saved)
        yield
        return
    python_stderr = sys.stderr
    sys.stderr = open(saved, "w", buffering=1, encoding=getattr(python_stderr, "encoding", None) or "utf-8",
                      errors="backslashreplace", closefd=False)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = python_stderr


_RAISED = re.compile(r"^([A-Za-z_][\w.]*): (\S.*)$")   # "module.ExceptionName: message", a traceback's last line


def _worker_failure(error: BaseException, ray_log: Path) -> EmbedError:
    """A failed Ray task or actor as one line: the worker's own exception, as its traceback ends.

    Ray hands the driver the worker's traceback as text inside its own exceptions (RayTaskError, Ray Data's
    UserCodeException); the last "name: message" line that is not Ray's is the exception the stage raised.
    uclip's own errors (a bundle graph that does not load, ...) say what to do and are shown as they are.
    """
    raised = [m.groups() for m in map(_RAISED.match, str(error).splitlines())
              if m and not m.group(1).startswith("ray.")]
    if raised:
        name, message = raised[-1]
        if name.startswith("uclip_cli."):
            return EmbedError(message)
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        name, message = type(error).__name__, (lines[-1] if lines else "")
    return EmbedError(f"a Ray worker failed: {name.rsplit('.', 1)[-1]}: {message} "
                      f"(Ray's logs: {ray_log} and /tmp/ray/session_latest/logs)")


def _start_ray(ray, options: EmbedOptions, log: Callable[[str], None]) -> None:
    _quiet_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = options.ray_address or "this machine"
        raise EmbedError(f"cannot start or reach Ray on {where} ({e}): check --ray-address") from None
    log(f"Ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs, {int(ray.cluster_resources().get('GPU', 0))} GPUs"
        + (f" at {options.ray_address}" if options.ray_address else " on this machine"))


def _dataset(ray, plan: list[list[list]], todo: list[int], bundle: Bundle, out_dir: Path, options: EmbedOptions):
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    gpus = int(ray.cluster_resources().get("GPU", 0)) if options.device != "cpu" else 0
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if gpus:
        actors = options.actors or gpus
        resources = {"num_gpus": 1, "num_cpus": 1}
    else:
        actors = options.actors or max(1, cpus // 4)
        resources = {"num_cpus": 1}
    items = [{"shard": i, "files": json.dumps(plan[i], ensure_ascii=False)} for i in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # Half a CPU per decode task: with the same reservation as the encoder actor, Ray Data fuses the two stages
    # into the actor (decoding then runs serially inside it, one core idle); apart, decode tasks run ahead of it.
    ds = ds.map_batches(_decode_shard, batch_size=1, num_cpus=0.5, fn_kwargs={"settings": bundle.image.__dict__})
    return ds.map_batches(
        _EncodeShards, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"bundle_path": str(bundle.path), "out_dir": str(out_dir), "device": options.device,
                               "threads": options.threads, "batch_size": options.batch_size},
        **resources)


def write_embed_report(out_dir: Path, shards: int) -> tuple[Path | None, int]:
    """OUT/report.json: every skipped file of every finished shard with its reason (as `uclip index` writes it)."""
    skipped = []
    for i in range(shards):
        path = out_dir / shard_name(i)
        if not path.exists():
            continue
        skipped += read_skipped(path)
    report = out_dir / REPORT
    if not skipped:
        report.unlink(missing_ok=True)
        return None, 0
    tmp = out_dir / f".{REPORT}.tmp"
    tmp.write_text(json.dumps({"skipped": skipped}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, report)
    return report, len(skipped)


def finished_shards(out_dir: Path) -> Iterable[Path]:
    return sorted(Path(out_dir).glob("shard-*.parquet"))

"""`uclip index`: plan (walk, compare with the catalogue) -> map (the image pipeline) -> commit (IndexSink).

- plan: `plan_index` walks the folders and asks the catalogue which files are new or changed.
- map: `pipeline.run_pipeline` reads, hashes, decodes (threads, ahead of the encoder) and encodes them;
  content the index already holds is recognised by hash and not decoded (a move, a copy, a touch).
- commit: `IndexSink` writes each encoded batch to the catalogue in one commit, so an interrupted run
  keeps everything before its last batch and a re-run resumes from there; `finish_index` then drops
  files that are gone, compacts and writes the report.
The map stage needs only the bundle, so it can run elsewhere (`uclip embed` on Ray writes its output as
shards, and `uclip index --import` commits them through the same sink).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bundle import HEAD_B, IMAGE_ENCODER, Bundle
from .display import shown_path
from .encoders import Encoders
from .errors import UclipError
from .image_pipeline import (DEFAULT_FILE_TIMEOUT, ENCODED_ELSEWHERE, BatchEncoder, EncodedBatch, ListedFile, Prepared, Preparer,
                       default_workers, prepare_in_threads, run_pipeline)
from .progress import Progress
from .sessions import SessionFactory
from .index.access import open_index
from .index.errors import IndexMissingError
from .index.identity import IndexIdentity
from .index.records import Embedded, Failed, Reused
from .index.store import IndexStore
from .walk import FileEntry, WalkWarning, resolve_root, walk_images

REPORT_NAME = "report.json"
WARNINGS_SHOWN = 10   # walk warnings printed; report.json lists all of them


@dataclass
class IndexOptions:
    exclude: list[str] = field(default_factory=list)
    include_hidden: bool = False
    batch_size: int = 32
    workers: int | None = None
    progress: bool = True
    report_path: Path | None = None
    rebuild: bool = False
    follow_links: bool = False                   # follow symlinked folders that point outside the indexed folders
    file_timeout: float = DEFAULT_FILE_TIMEOUT   # seconds one file may take to read + decode before it is given up
    ann: str | None = None          # the index's ann_mode setting to store: auto | on | off (None: keep it)


@dataclass
class IndexSummary:
    index_path: Path
    seen: int = 0
    unchanged: int = 0
    embedded: int = 0
    reused: int = 0                 # content already indexed at another path or with another mtime (not moved)
    moved: int = 0                  # content reused at a new path whose old path is gone in the same run
    failed: int = 0
    removed: int = 0                # records of files gone (not moved)
    reprojected: int = 0
    rejected: list[dict] = field(default_factory=list)   # `--import`: shard rows refused (shard, path, reason)
    described: int = 0              # unchanged photos whose metadata was read now (indexed before uclip kept it)
    total_ok: int = 0
    total_errors: int = 0
    seconds: float = 0.0
    provider: str = ""
    walk_warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None
    reused_hashes: Counter = field(default_factory=Counter, repr=False)   # content hash -> times reused this run

    @property
    def nothing_to_do(self) -> bool:
        """Every file found is as the index has it, and nothing was removed or re-projected."""
        return self.seen > 0 and self.unchanged == self.seen and not (self.removed or self.moved or self.reprojected
                                                                      or self.described)

    def format(self) -> str:
        if self.nothing_to_do:
            lines = [f"nothing new to index: {self.unchanged} files up to date"]
        else:
            embedded = f"{self.embedded} embedded"
            if self.embedded and self.provider and self.seconds > 0:
                embedded += f" ({self.embedded / self.seconds:.1f} images/s on {self.provider})"
            lines = [f"indexed {self.seen} files in {self.seconds:.1f} s: {embedded}, {self.moved} moved or renamed, "
                     f"{self.reused} reused (content already indexed: copied or touched), {self.unchanged} unchanged, "
                     f"{self.failed} skipped, {self.removed} removed"]
        if self.described:
            lines.append(f"read the metadata (date, camera, place) of {self.described} photos indexed before uclip kept it "
                         "(no image decoded)")
        if self.reprojected:
            lines.append(f"re-projected {self.reprojected} stored vectors for the bundle's new heads (no image decoded)")
        if self.rejected:
            first = self.rejected[0]
            where = f", all listed in {self.report_path}" if self.report_path else ""
            lines.append(f"refused {len(self.rejected)} shard rows that are not what `uclip embed` writes{where} "
                         f"(first: {first['path']} in {first['shard']}: {first['reason']})")
        lines.append(f"index {self.index_path}: {self.total_ok} images searchable, {self.total_errors} files skipped in all")
        return "\n".join(lines)

    def warning_lines(self, limit: int = WARNINGS_SHOWN) -> list[str]:
        """The walk's warnings for stderr: the first `limit`, then how many more and where they all are
        (indexing `/` by mistake once printed 4,175 of them)."""
        lines = [f"warning: {w}" for w in self.walk_warnings[:limit]]
        if len(self.walk_warnings) > limit:
            where = f", all listed in {self.report_path}" if self.report_path else ""
            lines.append(f"warning: ... and {len(self.walk_warnings) - limit} more{where}")
        return lines

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["index_path"] = str(self.index_path)
        d["report_path"] = str(self.report_path) if self.report_path else None
        d.pop("reused_hashes")
        return d


class IndexSink:
    """The commit stage: each encoded batch becomes one catalogue commit (new rows, reused rows, failures)."""

    def __init__(self, store: IndexStore, summary: "IndexSummary"):
        self.store, self.summary = store, summary

    def write(self, batch: EncodedBatch) -> None:
        embedded, reused, failed = [], [], []
        for item in batch.items:
            if item.status == "failed":
                failed.append(Failed(item.entry, item.error, item.content_hash))
            elif item.status == "known":
                row = self.store.catalogue.find_by_hash(item.content_hash)
                if row is None:
                    raise AssertionError(f"content of {item.entry.path} was reported as stored but has no row")
                reused.append(Reused(item.entry, item.content_hash, row, item.meta))
            else:
                embedded.append(Embedded(item.entry, item.content_hash, item.meta))
        if not (embedded or reused or failed):
            return
        features = batch.features if embedded else None
        vectors = batch.vectors if embedded else None
        self.store.add_batch(embedded, features, vectors, reused=reused, failed=failed)
        self.summary.embedded += len(embedded)
        self.summary.reused += len(reused)
        self.summary.reused_hashes.update(r.content_hash for r in reused)
        self.summary.failed += len(failed)


def open_index_for(bundle: Bundle, encoders: Encoders, index_path: Path, *, rebuild: bool = False) -> IndexStore:
    return open_index(index_path, IndexIdentity.of(bundle), "rebuild" if rebuild else "create", sessions=encoders.sessions)


def reproject_if_needed(store: IndexStore, bundle: Bundle, encoders: Encoders) -> int:
    """Re-apply the bundle's (new) Head_B to every stored frozen feature; no image is decoded."""
    if not store.needs_reprojection:
        return 0
    store.reproject(encoders.project_image, heads_fingerprint=bundle.heads_fingerprint, d_search=encoders.search_dim)
    return store.rows


class NothingToIndexError(UclipError):
    """`uclip index` without folders, on an index that holds none."""


def indexed_roots(index_path: Path, log: Callable[[str], None]) -> list[Path]:
    """The folders an existing index holds that are present now (an absent one, e.g. an unmounted drive, is kept as is)."""
    try:
        with open_index(index_path, mode="read") as store:
            roots = [Path(r) for r in store.catalogue.roots()]
    except IndexMissingError:
        roots = []
    if not roots:
        raise NothingToIndexError(f"no folders given and the index {index_path} holds none: run `uclip index FOLDER`")
    present = [r for r in roots if r.is_dir()]
    for r in roots:
        if not r.is_dir():
            log(f"note: {r} is not there now (unmounted?): its files stay in the index; `uclip forget {r}` drops them")
    if not present:
        raise NothingToIndexError(f"none of the folders in {index_path} is there now: {', '.join(map(str, roots))}")
    return present


def distinct_roots(roots: list[Path], log: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Resolved roots in the given order, without repeats or folders nested in another root (their files would count twice)."""
    resolved = list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))
    kept = []
    for root in resolved:
        outer = next((r for r in resolved if r != root and root.is_relative_to(r)), None)
        if outer is not None:
            log(f"note: {root} is inside {outer}, which is indexed too: indexing it once")
        else:
            kept.append(root)
    return kept


@dataclass
class IndexPlan:
    """What a run has to do: every file walked (by root), and those the catalogue does not hold as they are now."""

    entries_by_root: dict[Path, list[FileEntry]]
    todo: list[FileEntry]
    unchanged: int
    warnings: list[WalkWarning]

    @property
    def seen(self) -> int:
        return sum(len(e) for e in self.entries_by_root.values())


PERMISSION_DENIED = "unreadable: permission denied"   # images.read_image_bytes' reason


def plan_index(store: IndexStore, roots: list[Path], options: "IndexOptions") -> IndexPlan:
    """Walk `roots` (resolved, distinct) and compare each file with its record: same size and mtime = unchanged.

    Except a file skipped for want of read permission that can be read now: `chmod` changes neither
    size nor mtime, and the file deserves another try (one access() call per such record)."""
    warnings: list[WalkWarning] = []
    entries_by_root = {root: list(walk_images([root], exclude=options.exclude, include_hidden=options.include_hidden,
                                              warnings=warnings, follow_links=options.follow_links, indexed_roots=roots))
                       for root in roots}
    denied = {r.path for r in store.catalogue.errors() if r.error == PERMISSION_DENIED}
    todo: list[FileEntry] = []
    unchanged = 0
    for root, entries in entries_by_root.items():
        known = store.catalogue.known_files(root)
        for entry in entries:
            path = str(entry.path)
            if known.get(path) == (entry.size, entry.mtime_ns) and not (path in denied and os.access(path, os.R_OK)):
                unchanged += 1
            else:
                todo.append(entry)
    return IndexPlan(entries_by_root, todo, unchanged, warnings)


META_BATCH = 512      # records per commit when only their metadata is read


def fill_metadata(store: IndexStore, plan: IndexPlan, options: "IndexOptions") -> int:
    """Photos indexed before uclip kept metadata (unchanged, so not in plan.todo) get it now: each file's header
    only (photo_meta.read_meta_file: no pixel decoded, no vector computed), in threads, one commit per batch.
    Returns how many records took it."""
    from .photo_meta import read_meta_file

    changed = {str(e.path) for e in plan.todo}    # read in full by the pipeline anyway
    todo = []
    for entries in plan.entries_by_root.values():
        missing = store.details.missing_metadata(entries[0].root) if entries else set()
        todo += [e for e in entries if str(e.path) in missing and str(e.path) not in changed]
    if not todo:
        return 0
    done, batch = 0, []
    progress = Progress("reading metadata", len(todo), enabled=options.progress)
    for result in prepare_in_threads(lambda e: (e, read_meta_file(e.path, e.mtime_ns)), todo,
                                     workers=options.workers or default_workers(), file_timeout=options.file_timeout):
        progress.advance()
        if isinstance(result, tuple) and result[1] is not None:   # else unreadable now, or given up (a Prepared)
            entry, meta = result
            batch.append((str(entry.path), entry.size, entry.mtime_ns, meta))
        if len(batch) >= META_BATCH:
            done += store.details.commit_metadata(batch)
            batch = []
    if batch:
        done += store.details.commit_metadata(batch)
    progress.close()
    return done


def finish_index(store: IndexStore, plan: IndexPlan, summary: "IndexSummary", report_path: Path) -> None:
    """After every file of the plan is committed: drop records of files gone, compact, count, write the report."""
    unreadable = [w.path for w in plan.warnings]
    moved = _moved(store, plan, unreadable, summary.reused_hashes) if summary.reused_hashes else 0
    for root, entries in plan.entries_by_root.items():
        summary.removed += store.catalogue.remove_missing(entries[0].root if entries else root.resolve(),
                                                [str(e.path) for e in entries], keep_under=unreadable)
    summary.moved, summary.reused, summary.removed = moved, summary.reused - moved, summary.removed - moved
    store.compact()
    stats = store.stats()
    summary.total_ok, summary.total_errors = stats.ok, stats.errors
    summary.report_path = write_report(store, report_path, plan.warnings)


def _moved(store: IndexStore, plan: IndexPlan, unreadable: list, reused: Counter) -> int:
    """How many of this run's reused files are moves: their content's old path is about to be removed.

    A file renamed or moved is, to the catalogue, one record reused at a new path and one removed at
    the old: the user is told of one move, not of a reuse and a removal."""
    walked = {str(e.path) for entries in plan.entries_by_root.values() for e in entries}
    kept = tuple(str(u).rstrip(os.sep) for u in unreadable)
    gone: Counter = Counter()
    for root, entries in plan.entries_by_root.items():
        for path in store.catalogue.known_files(entries[0].root if entries else root.resolve()):
            if path in walked or any(path == k or path.startswith(k + os.sep) for k in kept):
                continue
            record = store.catalogue.lookup(path)
            if record is not None and record.status == "ok" and record.content_hash:
                gone[record.content_hash] += 1
    return sum((gone & reused).values())


def run_index(
    roots: list[Path | str],
    index_path: Path,
    bundle: Bundle,
    sessions: SessionFactory,
    options: IndexOptions | None = None,
    *,
    log: Callable[[str], None] = lambda m: None,
) -> IndexSummary:
    options = options or IndexOptions()
    if options.report_path is not None:
        check_report_path(options.report_path)   # before any work, not after it
    started = time.monotonic()
    encoders = Encoders(bundle, sessions)
    summary = IndexSummary(index_path=Path(index_path))
    for root in roots:   # before the index is opened (or created): a bad folder changes nothing
        resolve_root(root)
    roots = distinct_roots(roots or indexed_roots(index_path, log), log)
    with open_index_for(bundle, encoders, index_path, rebuild=options.rebuild) as store:
        summary.reprojected = reproject_if_needed(store, bundle, encoders)
        for note in store.notes:     # what opening found, and a re-projection's damaged features
            log(note)
        if options.ann is not None:
            store.set_setting("ann_mode", options.ann)
        plan = plan_index(store, roots, options)
        summary.seen, summary.unchanged = plan.seen, plan.unchanged
        summary.described = fill_metadata(store, plan, options)
        try:
            if plan.todo:
                encoders.preload(IMAGE_ENCODER, *([HEAD_B] if bundle.has_heads else []))
            stored_hashes = {r.content_hash for r in store.catalogue.records() if r.row is not None}
            progress = Progress("indexing", len(plan.todo), enabled=options.progress and bool(plan.todo))
            run_pipeline(plan.todo, Preparer(bundle.image, known=stored_hashes.__contains__),
                         BatchEncoder.of(encoders, project=True), IndexSink(store, summary),
                         workers=options.workers or default_workers(), batch_size=options.batch_size,
                         file_timeout=options.file_timeout, on_item=lambda _: progress.advance())
            progress.close()
        finally:
            encoders.finish_preloads()    # e.g. every photo was known or failed: the load still ran behind us
        finish_index(store, plan, summary, options.report_path or Path(index_path) / REPORT_NAME)
    summary.provider = ", ".join(sorted({m[0] for m in encoders.loaded_providers().values()}))
    summary.walk_warnings = [f"{shown_path(str(w.path))}: {w.reason}" for w in plan.warnings]
    summary.seconds = time.monotonic() - started
    return summary


IMPORT_BATCH = 256


def run_import(
    shard_arguments: list[str],
    index_path: Path,
    bundle: Bundle,
    sessions: SessionFactory,
    options: IndexOptions | None = None,
    *,
    log: Callable[[str], None] = lambda m: None,
) -> IndexSummary:
    """`uclip index --import SHARDS`: merge `uclip embed`'s shards into the index; no image is decoded.

    The commit stage of `run_index` (IndexSink, one commit per batch) fed from shards instead of the
    map stage: a file whose record already has the shard's size and mtime is unchanged (importing the
    same shards again changes nothing), content the index holds already reuses its row, failures are
    recorded with their reasons. Shards of another image encoder are refused; shards projected with
    other heads than the bundle's are re-projected from their frozen features. Nothing is removed.
    Each row is checked first (shards.row_problems: finite unit features, a content hash, a path inside a
    root that is not `/`), and a path listed twice is taken once: a bad row is refused with its reason
    (in the summary and in report.json's "refused_rows") and the others land.
    """
    from .shards import ShardError, iter_shards, row_problems, shard_files

    options = options or IndexOptions()
    if options.report_path is not None:
        check_report_path(options.report_path)   # before any work, not after it
    started = time.monotonic()
    paths = shard_files(shard_arguments)
    encoders = Encoders(bundle, sessions)
    summary = IndexSummary(index_path=Path(index_path))
    progress = Progress("importing", len(paths), unit="shards", enabled=options.progress)
    with open_index_for(bundle, encoders, index_path, rebuild=options.rebuild) as store:
        summary.reprojected = reproject_if_needed(store, bundle, encoders)
        for note in store.notes:     # what opening found, and a re-projection's damaged features
            log(note)
        if options.ann is not None:
            store.set_setting("ann_mode", options.ann)
        sink = IndexSink(store, summary)
        known_by_root: dict[str, dict[str, tuple[int, int]]] = {}
        taken: dict[str, str] = {}      # path -> the shard its row was taken from (a path lands once)
        for path, info, rows in iter_shards(paths):
            if info.image_fingerprint != bundle.image_fingerprint or info.d_clip != bundle.dims["clip"]:
                raise ShardError(f"{path}: embedded with another image encoder ({info.image_fingerprint}) than "
                                 f"{bundle.path} ({bundle.image_fingerprint}): embed again with this bundle")
            vectors = rows.vectors
            own_vectors = vectors is not None and info.heads_fingerprint == bundle.heads_fingerprint
            if own_vectors and vectors.shape[1] != encoders.search_dim:
                raise ShardError(f"{path}: its vectors are {vectors.shape[1]}-d, {bundle.path} searches "
                                 f"{encoders.search_dim}-d: embed again with this bundle")
            problems = row_problems(rows, check_vectors=own_vectors)
            if not own_vectors:
                vectors = np.zeros((len(rows.features), encoders.search_dim), np.float32)
                ok_rows = [i for i, s in enumerate(rows.status) if s == "ok"]
                good = np.asarray([i not in problems for i in ok_rows], dtype=bool)
                if good.any():     # only sound features reach the head: no NaN or overflow inside it
                    vectors[good] = encoders.project_image(rows.features[good])
            _import_rows(rows, vectors, store, sink, summary, known_by_root, problems, taken, path)
            progress.advance()
        progress.close()
        store.compact()
        stats = store.stats()
        summary.total_ok, summary.total_errors = stats.ok, stats.errors
        summary.report_path = write_report(store, options.report_path or Path(index_path) / REPORT_NAME,
                                           refused_rows=summary.rejected)
    summary.provider = ", ".join(sorted({m[0] for m in encoders.loaded_providers().values()}))
    summary.seconds = time.monotonic() - started
    return summary


def _import_rows(rows, vectors: np.ndarray, store: IndexStore, sink: IndexSink, summary: IndexSummary,
                 known_by_root: dict[str, dict[str, tuple[int, int]]], problems: dict[int, str],
                 taken: dict[str, str], shard: Path) -> None:
    items: list[Prepared] = []
    take: list[int] = []          # ok-row numbers (into features / vectors) of the items to add as new rows
    ok_row = -1

    def flush() -> None:
        if items:
            sink.write(EncodedBatch(list(items), rows.features[take], vectors[take]))
            items.clear()
            take.clear()

    for i, path in enumerate(rows.path):
        ok = rows.status[i] == "ok"
        ok_row += ok
        reason = problems.get(i)
        if reason is None and path in taken:
            reason = f"listed twice in the shards (first in {taken[path]}): taken once"
        if reason is not None:
            summary.rejected.append({"shard": str(shard), "path": str(path), "reason": reason})
            continue
        taken[path] = str(shard)
        summary.seen += 1
        root = rows.root[i]
        if root not in known_by_root:
            known_by_root[root] = store.catalogue.known_files(root)
        if known_by_root[root].get(path) == (rows.size[i], rows.mtime_ns[i]):
            summary.unchanged += 1
            continue
        entry = ListedFile(path, root, rows.size[i], rows.mtime_ns[i])
        digest = rows.content_hash[i]
        if not ok:
            items.append(Prepared(entry, digest, error=rows.reason[i] or "skipped"))
        elif store.catalogue.find_by_hash(digest) is not None:
            items.append(Prepared(entry, digest))
        else:
            items.append(Prepared(entry, digest, pixels=ENCODED_ELSEWHERE))
            take.append(ok_row)
        if len(items) >= IMPORT_BATCH:
            flush()
    flush()


def write_report(store: IndexStore, path: Path, walk_warnings: Sequence[WalkWarning] = (),
                 refused_rows: Sequence[dict] = ()) -> Path | None:
    """Every skipped file with its reason, every warning of this run's walk (folders that could not be
    listed, links not followed) and every shard row `--import` refused, as JSON (written atomically);
    None when there is none of them."""
    skipped = [{"path": r.path, "reason": r.error, "size": r.size} for r in store.catalogue.errors()]
    warned = [{"path": str(w.path), "reason": w.reason} for w in walk_warnings]
    path = Path(path)
    if not skipped and not warned and not refused_rows:
        if path.exists() and path.name == REPORT_NAME:
            path.unlink()
        return None
    check_report_path(path)
    tmp = path.with_name(path.name + ".tmp")
    report = {"skipped": skipped, **({"walk_warnings": warned} if warned else {}),
              **({"refused_rows": list(refused_rows)} if refused_rows else {})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report {path} ({e.strerror}): everything indexed is kept; "
                          "pass another --report") from None
    return path


class NotIndexedError(UclipError):
    """`uclip forget` of a folder the index holds nothing under."""


class ReportError(UclipError):
    """--report names a place where the report cannot be written."""


def check_report_path(path: Path) -> None:
    """Refuse, before any work, a report path that is a folder or lies in a folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"--report {path} is a folder: name a file, e.g. {path / REPORT_NAME}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ReportError(f"--report {path}: {parent or path.parent} cannot be written: pass another --report")


def forget_folders(folders: list[Path], index_path: Path) -> dict[Path, int]:
    """Remove every record under each folder (present on disk or not); returns folder -> records removed.

    Every folder is checked first: one the index holds nothing under is an error naming it, and
    nothing is forgotten (a typo must not look like success)."""
    removed = {}
    with open_index(index_path, mode="write") as store:
        targets = {Path(f).expanduser().absolute(): None for f in folders}
        targets = {f: f.resolve() if f.exists() else f for f in targets}
        for folder, inside in targets.items():
            if not store.catalogue.known_files(inside):
                roots = store.catalogue.roots()
                raise NotIndexedError(f"{folder} is not in the index {index_path} (nothing under it was indexed): "
                                      f"nothing forgotten; its folders: {', '.join(roots[:5]) or 'none'}")
        for folder, inside in targets.items():
            removed[folder] = store.catalogue.remove_missing(inside, [])
        store.compact()
    return removed

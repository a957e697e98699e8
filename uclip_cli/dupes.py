"""Near-duplicates: groups of indexed photos whose frozen image features lie within a cosine threshold
(bursts, edits, re-saves, resized or slightly cropped copies), for `uclip dupes` and GET /api/dupes.

Which vectors. The comparison runs on the stored frozen image features (`store.features()`: the image
tower's own CLIP space, unit rows), not on the search vectors (Head_B's output). Head_B is trained to
bring a photo close to *text* about it, so it may fold photos of the same kind of scene together (two
different beaches) and its space changes whenever the heads are retrained; the frozen features describe
the pixels alone, are the same for every heads bundle over one image tower, and are what the published
near-duplicate thresholds for CLIP image embeddings are stated in.

Threshold. DEFAULT_THRESHOLD = 0.95 cosine for CLIP ViT-B/32 image features, the value commonly used for
CLIP-based duplicate finding: a JPEG re-save, a resize or a crop by a few pixels changes the features
far less than that, while different photos of the same kind of scene sit lower. It is a chosen default,
not one measured here on real weights (the tests' tiny bundle has random weights, so they pick their own
threshold from the features it gives); lower it (0.92) to gather whole bursts, raise it (0.98) for copies
only. Values below MIN_THRESHOLD are refused: there "near-duplicate" means "same topic".

Cost. The pairs at or above the threshold come from near_pairs.py: every pair compared (blocked, exact)
up to EXACT_ROWS photos or with `--exact`, above that only the pairs within nearby k-means cells (seconds at
100,000 photos instead of ~45 s; recall measured in bench/bench_dupes.py); every pair reported is checked
in float64 either way. Then union-find over those pairs. The catalogue is read before and after the pair
search, not during it, so a server holds its lock only for those reads (`lock`). Nothing here writes or
deletes anything.

Identical content at several paths shares one catalogue row (its content hash): such a row is one member
whose `paths` lists each copy ("exact copies"), and a row with several paths is a group on its own.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UclipError
from .near_pairs import Progress, find_pairs

DEFAULT_THRESHOLD = 0.95
MIN_THRESHOLD = 0.5          # below this "near-duplicate" means "same topic": refused, not slow
PROGRESS_ROWS = 5000         # fewer photos take well under a second: no progress shown


class DupesError(UclipError):
    """`uclip dupes` cannot run as asked (a bad threshold, an empty index, a folder it does not hold)."""


@dataclass
class Member:
    row: int
    paths: list[str]                 # every path holding this exact content (exact copies), sorted
    similarity: float                # cosine to the group's first member (1.0 for the first)
    id: str | None = None
    size: int | None = None          # bytes of the first path's file as indexed
    width: int | None = None
    height: int | None = None
    taken: str | None = None
    taken_source: str | None = None

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.paths[0] if self.paths else "", "paths": self.paths,
                "exact_copies": len(self.paths), "similarity": round(self.similarity, 6), "size": self.size,
                "width": self.width, "height": self.height, "taken": self.taken, "taken_source": self.taken_source}


@dataclass
class Group:
    members: list[Member]

    @property
    def files(self) -> int:
        return sum(len(m.paths) for m in self.members)

    def to_dict(self) -> dict:
        return {"files": self.files, "photos": len(self.members), "members": [m.to_dict() for m in self.members]}


@dataclass
class DupesResult:
    threshold: float
    photos: int                      # distinct photos (rows) compared
    groups: list[Group] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "photos": self.photos, "groups": [g.to_dict() for g in self.groups],
                "seconds": round(self.seconds, 3)}


def check_threshold(value: float, name: str = "--threshold") -> float:
    """A cosine threshold from MIN_THRESHOLD to 1, or one line naming `name`."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not MIN_THRESHOLD <= value <= 1.0:
        raise DupesError(f"{name} {value}: give a cosine from {MIN_THRESHOLD} to 1 (default {DEFAULT_THRESHOLD}; "
                         "higher finds only closer copies)")
    return float(value)


def components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Union-find over pairs of 0..n-1: the connected sets of two or more, each ascending."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    touched = np.unique(np.concatenate([i, j])) if len(i) else np.zeros(0, np.int64)
    by_root: dict[int, list[int]] = {}
    for a in touched.tolist():
        by_root.setdefault(root(a), []).append(a)
    return [np.asarray(sorted(m)) for m in by_root.values() if len(m) > 1]


def find_dupes(store, threshold: float = DEFAULT_THRESHOLD, under: str | os.PathLike | None = None, *,
               exact: bool | None = None, progress: Progress | None = None, lock=None,
               find: Callable | None = None, clock: Callable[[], float] | None = None) -> DupesResult:
    """Groups of near-duplicate photos in an open IndexStore (read), largest group first; `under`: only the
    photos with a file in that folder. Raises DupesError when there is nothing to compare.

    `exact`: True compares every pair, False the nearby ones, None lets near_pairs.choose pick by size.
    `lock`: held around the catalogue reads only (a server's lock: the pair search, the long part, runs on
    the memory-mapped features without it). `find`: the pair search (near_pairs.find_pairs; tests inject)."""
    import time

    clock = clock or time.perf_counter
    started = clock()
    threshold = check_threshold(threshold)
    lock = lock if lock is not None else contextlib.nullcontext()
    with lock:
        rows, features, same = _inputs(store, under)
    find = find or find_pairs
    i, j = find(features[rows] if len(rows) < len(features) else features, threshold, exact=exact,
                progress=progress if len(rows) >= PROGRESS_ROWS else None)
    sets = _sets(rows, i, j, same, len(features))
    with lock:
        result = _described(store, rows, sets, same, features, threshold)
    result.seconds = clock() - started
    return result


def _inputs(store, under) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """(the rows compared, the features map, the exact copies): the catalogue reads before the search."""
    catalogue = store.catalogue
    if store.stats().ok == 0:
        raise DupesError(f"the index {store.path} holds no photos yet: run `uclip index FOLDER` first")
    mask = catalogue.search_mask(os.fspath(under) if under is not None else None)
    rows = np.arange(store.rows) if mask is None else np.flatnonzero(mask)
    if under is not None and not len(rows):
        roots = catalogue.roots()
        raise DupesError(f"--in {under}: the index {store.path} holds no photo under it; its folders: "
                         + (", ".join(roots[:5]) + (f" and {len(roots) - 5} more" if len(roots) > 5 else "")))
    return rows, store.features(), exact_copies(catalogue)


def _sets(rows: np.ndarray, i: np.ndarray, j: np.ndarray, same: dict[str, list[int]], total: int) -> list[np.ndarray]:
    """The connected sets of rows (index rows, ascending) over the pairs found (positions in `rows`) and the
    identical contents (one row with several paths, or several rows of one hash embedded in one batch)."""
    whole = len(rows) == total
    position = None if whole else {int(r): k for k, r in enumerate(rows.tolist())}
    extra_i, extra_j = [], []
    for copy_rows in same.values():
        inside = [r if position is None else position.get(r) for r in copy_rows]
        inside = [k for k in inside if k is not None]
        extra_i += inside[:1] * (len(inside) - 1)
        extra_j += inside[1:]
    i = np.concatenate([i, np.asarray(extra_i, np.int64)])
    j = np.concatenate([j, np.asarray(extra_j, np.int64)])
    sets = [rows[c] for c in components(len(rows), i, j)]
    copied = {r for copy_rows in same.values() for r in copy_rows}
    in_sets = {int(r) for s in sets for r in s}
    return sets + [np.asarray([r]) for r in sorted(copied - in_sets) if whole or r in position]


def _described(store, rows: np.ndarray, sets: list[np.ndarray], same: dict, features: np.ndarray,
               threshold: float) -> DupesResult:
    """The groups with their paths, sizes, pixels and capture times (catalogue reads), largest first."""
    catalogue = store.catalogue
    wanted = sorted({int(r) for s in sets for r in s})
    ids, paths = catalogue.ids_and_paths_for_rows(wanted)
    described = store.details.metadata_for_rows(wanted)
    # rows of one content count once (both are in `wanted`: exact copies always form a set)
    photos = len({ids.get(int(r), int(r)) for r in rows.tolist()}) if same else len(rows)
    result = DupesResult(threshold, photos)
    for members in sets:
        by_id: dict = {}
        for r in members.tolist():
            where = paths.get(r, [])
            if not where:
                continue
            known = by_id.get(ids.get(r, r))
            if known is not None:          # the same content at another row: one member, its paths joined
                known.paths = sorted(known.paths + where)
                continue
            meta = described.get(r)
            record = catalogue.lookup(where[0])
            by_id[ids.get(r, r)] = Member(r, where, 1.0, ids.get(r), record.size if record else None,
                                          meta.width if meta else None, meta.height if meta else None,
                                          meta.taken if meta else None, meta.taken_source if meta else None)
        group = list(by_id.values())
        if sum(len(m.paths) for m in group) < 2:
            continue
        # the largest (most pixels, then most bytes) first: the one a user most likely keeps
        group.sort(key=lambda m: (-m.pixels, -(m.size or 0), m.paths[0]))
        first = np.asarray(features[group[0].row], dtype=np.float64)
        for m in group[1:]:
            m.similarity = float(np.dot(first, np.asarray(features[m.row], dtype=np.float64)))
        result.groups.append(Group(group))
    result.groups.sort(key=lambda g: (-g.files, g.members[0].paths[0]))
    return result


def exact_copies(catalogue) -> dict[str, list[int]]:
    """content hash -> the rows (ascending) of each content that more than one indexed path holds."""
    found: dict[str, set[int]] = {}
    for content, row in catalogue.connection.execute(
            "SELECT content_hash, row FROM files WHERE row IS NOT NULL AND row < ? AND content_hash IN "
            "(SELECT content_hash FROM files WHERE row IS NOT NULL AND content_hash IS NOT NULL "
            "GROUP BY content_hash HAVING COUNT(*) > 1)", (catalogue.rows,)):
        found.setdefault(content, set()).add(int(row))
    return {content: sorted(rows) for content, rows in found.items()}


def nothing_found(result: DupesResult) -> str:
    """The one line `uclip dupes` prints when there is no group."""
    if result.photos < 2:
        return f"only {result.photos} photo in the index: nothing to compare"
    return f"no near-duplicates among {result.photos} photos at cosine >= {result.threshold}; nothing was deleted"


def format_dupes(result: DupesResult, fmt: str) -> str:
    """table | json | paths (one path a line, a blank line between groups)."""
    import json

    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, ensure_ascii=False)
    if fmt == "paths":
        return "\n\n".join("\n".join(p for m in g.members for p in m.paths) for g in result.groups)
    lines = []
    for n, g in enumerate(result.groups, 1):
        lines.append(f"group {n}: {g.files} files, {len(g.members)} distinct "
                     "(cosine to the first, pixels, size, taken, path; largest first)")
        for k, m in enumerate(g.members):
            pixels = f"{m.width}x{m.height}" if m.width and m.height else "?"
            size = _size(m.size)
            taken = m.taken.replace("T", " ") if m.taken else "?"
            mark = "first" if k == 0 else f"{m.similarity:.3f}"
            for c, path in enumerate(m.paths):
                note = "" if c == 0 else "   (exact copy)"
                lines.append(f"  {mark:>6}  {pixels:>11}  {size:>8}  {taken:<19}  {path}{note}")
    lines.append(f"{len(result.groups)} groups among {result.photos} photos at cosine >= {result.threshold} "
                 f"({result.seconds:.2f} s); nothing was deleted")
    return "\n".join(lines)


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"

"""`uclip check`: read every byte of an index, say what is damaged, and with `--repair` mend what can be.

Queries check only what they touch (search.py: the rows of an answer, the int8 blocks they scan, the
ANN file's head); the writer's open checks the catalogue against the row files, and the int8 copy and
the ANN file in full. This reads everything:

- the catalogue: SQLite's own check of every page, the schema and meta values, and the row count
  against the records (IndexStore opening);
- every row in use, in both row files: finite and of unit length, as uclip writes them (features
  are frozen CLIP outputs, vectors Head_B outputs, both L2-normalised);
- the int8 copy: every block's statistics and codes against its check record, spot rows against the
  float32 rows (ExactIndex.verify);
- the approximate index: its whole-file digest, and faiss reading it (AnnIndex.verify).

`--repair` (takes the writer lock):
- the catalogue's row count, the int8 copy and the ANN file: the writer's open rebuilds what fails;
- search vectors that are damaged while their frozen features are intact: computed again from the
  features with the bundle's Head_B (a re-projection: a new generation of the vectors file, the old one
  stays in force until it is complete);
- rows whose frozen features are damaged: nothing to compute them from, so their records are dropped and
  the next `uclip index` embeds those photos again (their files are still on disk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UclipError
from .exact import UNIT_TOLERANCE
from .access import open_index
from .errors import IndexCorruptError
from .store import IndexStore

CHUNK_ROWS = 65_536


@dataclass
class CheckReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                "repaired": self.repaired}


def unsound_rows(store: IndexStore, kind: str, rows: np.ndarray) -> np.ndarray:
    """Of `rows`, those whose `kind` row (features or vectors) is not finite, not of unit length, or fails
    its checksum (a flipped sign bit keeps the length: only the checksum sees it)."""
    array = store.features() if kind == "features" else store.vectors()
    return np.union1d(damaged_rows(array, rows), store.row_files.unsound(kind, rows, data=array)).astype(np.int64)


def damaged_rows(rows_array: np.ndarray, rows: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Of `rows`, those whose vector in `rows_array` is not finite or not of unit length."""
    bad = []
    for start in range(0, len(rows), CHUNK_ROWS):
        part = rows[start:start + CHUNK_ROWS]
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(np.asarray(rows_array[part], dtype=np.float64), axis=1)
        bad.append(part[~(np.abs(norms - 1.0) <= UNIT_TOLERANCE)])
        if progress:
            progress(min(start + CHUNK_ROWS, len(rows)), len(rows))
    return np.concatenate(bad) if bad else np.empty(0, np.int64)


Projector = Callable[[], tuple[str, Callable[[np.ndarray], np.ndarray]]]


def run_check(index_path: Path, *, repair: bool = False, project: Projector | None = None,
              log: Callable[[str], None] = lambda m: None) -> CheckReport:
    """Check the index at `index_path`; `repair` mends it. `project()` gives the bundle's heads fingerprint
    and its image projection (Head_B), asked for only when search vectors must be computed again."""
    report = CheckReport()
    try:
        store = open_index(index_path, mode="read")
    except UclipError as e:
        report.add("catalogue", False, str(e))
        if not repair:
            return report
        store = None
    if store is not None:
        with store:
            _check(store, report)
    if repair and not report.ok:
        _repair(index_path, report, project, log)
    return report


def _check(store: IndexStore, report: CheckReport) -> None:
    problems = store.catalogue.problems()
    records = sum(1 for _ in store.catalogue.records())            # every record's signature
    if store.catalogue.damaged_records:
        problems.append(f"{store.catalogue.damaged_records} records damaged (their signature fails): left out of every answer")
    report.add("catalogue", not problems and not store.notes,
               "; ".join([*problems, *store.notes]) or f"{records} records, {store.rows} rows")
    live = store.catalogue.live_rows()
    for kind in ("vectors", "features"):
        try:
            bad = unsound_rows(store, kind, live)
        except IndexCorruptError as e:         # cut off: the writer's open (--repair) drops what it lost
            report.add(f"{kind} rows", False, str(e))
            continue
        report.add(f"{kind} rows", bad.size == 0, f"{live.size} rows in use, all unit vectors matching their checksums"
                   if bad.size == 0 else f"{bad.size} of {live.size} rows damaged (not finite, not unit length, or not "
                   "matching their checksums), e.g. rows " + ", ".join(map(str, bad[:5].tolist())))
    if store.vectors_problem is not None:      # the vectors rows' check said why; the derived indexes wait for them
        return
    for ix in store.indexes():
        covered = ix.verify(store.vectors())
        expected = ix.committed_rows
        if covered == expected == 0:
            report.add(f"{ix.kind} index", True, ix.unbuilt())
            continue
        report.add(f"{ix.kind} index", covered >= expected,
                   f"{covered} rows covered and intact" if covered >= expected else
                   f"damaged: {covered} of the {expected} rows it covers pass its checks (search falls back "
                   "to the float32 rows until it is rebuilt)")


def _repair(index_path: Path, report: CheckReport, project, log) -> None:
    with open_index(index_path, mode="write") as store:    # the writer's open repairs what it can
        report.repaired.extend(store.notes)
        dropped = store.catalogue.drop_damaged_records()
        if dropped:
            report.repaired.append(f"{len(dropped)} damaged catalogue records dropped: the next `uclip index` "
                                   "embeds their photos again")
        live = store.catalogue.live_rows()
        features_bad = unsound_rows(store, "features", live)
        if features_bad.size:
            forgotten = store.catalogue.forget_rows(features_bad)
            report.repaired.append(f"{len(forgotten)} photos had damaged image features: dropped from the index, "
                                   "the next `uclip index` embeds them again")
        vectors_bad = (np.empty(0, np.int64) if store.needs_reprojection   # every vector is computed again anyway
                       else unsound_rows(store, "vectors", store.catalogue.live_rows()))
        if vectors_bad.size or store.needs_reprojection:
            if project is None:
                raise UclipError(f"{vectors_bad.size} search vectors are damaged: give --bundle so that they can be "
                                 "computed again from the stored image features")
            heads, head = project()
            if heads != store.heads_fingerprint:
                raise UclipError(f"the bundle's heads ({heads}) are not those the index was projected with "
                                 f"({store.heads_fingerprint}): run `uclip index`, which re-projects every vector")
            d = head(np.zeros((1, store.d_clip), np.float32)).shape[1]
            if d != store.d_search:
                raise UclipError(f"the index {store.path}: its catalogue says {store.d_search}-d search vectors, but the "
                                 f"heads they were made with give {d}-d (the catalogue is damaged): run `uclip index "
                                 "--rebuild` (embeds every photo again), or restore the index from a backup")
            # rows just dropped for damaged features are dead: any finite input will do for them
            store.reproject(lambda f: head(np.clip(np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)),
                            heads_fingerprint=store.heads_fingerprint, d_search=store.d_search)
            report.repaired.append(f"{vectors_bad.size} damaged search vectors computed again from the stored image "
                                   "features (every vector re-projected)")
        store.compact()
    for line in report.repaired:
        log(line)
    after = CheckReport()
    with open_index(index_path, mode="read") as store:
        _check(store, after)
    report.checks = after.checks

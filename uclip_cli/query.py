"""`uclip query`: text (any language), an example image, or terms combined -> the best-matching indexed images.

The command's part: the query string as a shell user types it (`read_terms`), one run with its timings
(`run_query`), and the printed results. The query string is read by uclip_cli.terms (one grammar for the
CLI and `uclip serve`); photo_search.py, shared with the server, turns terms into a search vector and
finds the best rows.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as B
from .display import shown_path
from .encoders import Encoders
from .filters import SORTS, FilterError, read_filters
from .index.records import PhotoFilter
from .photo_search import (ENGLISH_FILES, IMAGE_FILES, TEXT_FILES, UNTRAINED_NOTE, QueryError, by_date, damage_note,
                           explain_no_hits, filter_note, image_vector, open_searchable, query_vector, search_rows)
from .sessions import SessionFactory
from .terms import IMAGE, TEXT, QueryTerms, QueryTermsError, Term, looks_like_path, parse_terms, split_filters





@dataclass
class Hit:
    path: str
    score: float | None         # None: a query of filters alone (no words to score by)
    id: str | None = None       # the photo's content id (id:... in query terms, /thumb/{id} in `uclip serve`)
    taken: str | None = None    # capture time (local), when the index knows it


@dataclass
class QueryResult:
    query: str
    kind: str                   # "text" | "image" | "combined" (several terms, or a weight)
    space: str                  # "shared" (trained heads) | "clip" (English / raw CLIP, no heads yet)
    hits: list[Hit] = field(default_factory=list)
    terms: QueryTerms | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    sorted_by: str = "score"


def run_query(
    query: str,
    *,
    index_path: Path,
    bundle_path: Path,
    sessions: SessionFactory,
    top: int = 10,
    min_score: float | None = None,
    folder: Path | None = None,
    force_text: bool = False,
    exact: bool = False,
    filters: list[tuple[str, str, str]] = (),
    sort: str = "score",
) -> QueryResult:
    """Search by `query`: text in any language, an image path, or terms combined (see uclip_cli.terms), among
    the photos that pass `filters` (filters.cli_filters) and the filter words of the query itself; `sort`:
    "score" (best first), "date" (the best matches, oldest first) or "newest". Filters alone list every photo
    that passes, by date (newest first unless `sort` is "date")."""
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    if sort not in SORTS:
        raise QueryError(f"--sort {sort}: use {', '.join(SORTS)}")
    terms, photo_filter, shown = read_query(query, force_text=force_text, filters=filters)
    if top < 1:
        raise QueryError(f"--top {top}: give at least 1")
    bundle = B.load_bundle(bundle_path, verify="cached", only=())   # read-only: the cheap check suffices
    bundle.check_now((IMAGE_FILES if terms.has(IMAGE) else ()) + (
        (TEXT_FILES if bundle.has_heads else ENGLISH_FILES) if terms.has(TEXT) else ()))
    lap("bundle")
    encoders = Encoders(bundle, sessions, text_precision="auto")   # the faster text tower on this CPU
    if not terms.terms:
        return _filtered_only(query, index_path, bundle, encoders, top, folder, photo_filter, shown, sort, timings)
    result = QueryResult(query, terms.kind, encoders.space, terms=terms, sorted_by=sort)
    if not bundle.has_heads and terms.has(TEXT):
        result.notes.append(UNTRAINED_NOTE)
    store = open_searchable(index_path, bundle, encoders)
    with store:
        lap("index")
        vector, exclude_rows = query_vector(
            terms, store, encoders.encode_text_query,
            lambda path: image_vector(path, bundle, encoders, store))
        lap("encode")
        searched: dict = {}
        rows, scores = search_rows(store, vector, top, min_score=min_score,
                                   folder=folder.expanduser().resolve() if folder else None, exclude_rows=exclude_rows,
                                   exact=exact, info=searched, photo_filter=photo_filter)
        if sort != "score":
            rows, scores = by_date(store, rows, scores, newest_first=sort == "newest")
        taken = store.details.metadata_for_rows(rows.tolist())
        result.notes.extend([*store.notes, *filter(None, [damage_note(searched), filter_note(store, photo_filter)])])
        ids, paths = store.catalogue.ids_and_paths_for_rows(rows.tolist())
        if store.catalogue.damaged_records:
            result.notes.append(f"note: {store.catalogue.damaged_records} records of the index catalogue are damaged and were "
                                "left out: run `uclip check --repair`")
        query_paths = {str(Path(t.value).expanduser().resolve()) for t in terms.terms if t.kind == IMAGE}
        for row, score in zip(rows.tolist(), scores.tolist()):
            for path in paths.get(row, []):
                if path not in query_paths and len(result.hits) < top:
                    result.hits.append(Hit(path, float(score), ids.get(row), _taken(taken.get(row))))
        if not result.hits:
            explain_no_hits(store, folder, photo_filter, shown)
        lap("search")
    timings["encode"] -= sum(encoders.load_seconds.values())   # "encode" is tokenise + run alone
    result.timings = {**timings, **encoders.load_seconds}
    return result






def _taken(meta) -> str | None:
    return meta.taken if meta is not None else None


def read_query(query: str, *, force_text: bool = False, filters: list[tuple[str, str, str]] = ()
               ) -> tuple[QueryTerms, PhotoFilter | None, str]:
    """The query's terms, the filter of `filters` and the query's own filter words (None: none), and how to
    name them in a message. A query of filter words alone has no terms."""
    rest, found = (query, []) if force_text or _names_file(query) else split_filters(query)
    given = [*filters, *found]
    try:
        photo_filter = read_filters(given) if given else None
    except FilterError as e:
        raise QueryError(str(e)) from None
    shown = " ".join(g[2] for g in given)
    if given and not rest.strip():
        return QueryTerms(()), photo_filter, shown
    return read_terms(rest, force_text=force_text), photo_filter, shown


def _filtered_only(query: str, index_path: Path, bundle: B.Bundle, encoders: Encoders, top: int, folder: Path | None,
                   photo_filter: PhotoFilter, shown: str, sort: str, timings: dict) -> QueryResult:
    """Filters alone: the photos that pass, by capture time (no vector, no model run)."""
    started = time.perf_counter()
    result = QueryResult(query, "filters", encoders.space, terms=QueryTerms(()), sorted_by=sort)
    with open_searchable(index_path, bundle, encoders) as store:
        under = folder.expanduser().resolve() if folder else None
        mask = store.details.filter_mask(photo_filter)
        within = store.catalogue.search_mask(under)
        rows = np.flatnonzero(mask if within is None else mask & within)
        rows, _ = by_date(store, rows, np.zeros(len(rows), np.float32), newest_first=sort != "date")
        rows = rows[:top]
        ids, paths = store.catalogue.ids_and_paths_for_rows(rows.tolist())
        taken = store.details.metadata_for_rows(rows.tolist())
        result.notes.extend([*store.notes, *filter(None, [filter_note(store, photo_filter)])])
        for row in rows.tolist():
            for path in paths.get(row, []):
                if len(result.hits) < top:
                    result.hits.append(Hit(path, None, ids.get(row), _taken(taken.get(row))))
        if not result.hits:
            explain_no_hits(store, folder, photo_filter, shown)
    timings["search"] = time.perf_counter() - started
    result.timings = timings
    return result


def _exists(typed: str) -> bool:
    try:
        return Path(typed.removeprefix("file://")).expanduser().exists()
    except (OSError, ValueError):   # a name too long for the filesystem, a NUL: not a path
        return False






def _names_file(query: str) -> bool:
    whole = query.strip()
    return bool(whole) and _exists(whole) and (looks_like_path(whole) or not any(c.isspace() for c in whole))


def read_terms(query: str, *, force_text: bool = False) -> QueryTerms:
    """The CLI's terms: a query that names an existing file or folder as a whole (spaces and all; a bare
    word too, as a shell user types `uclip query photos`) is that one image, so that a folder or a
    text file is an error that says so (--text searches for the words); anything else is read by the
    terms grammar, where "AC/DC concert" and "St. Vitus" stay text."""
    whole = query.strip()
    if not force_text and _names_file(query):
        return QueryTerms((Term(1.0, IMAGE, whole),))
    try:
        return parse_terms(query, force_text=force_text)
    except QueryTermsError as e:
        raise QueryError(str(e)) from None














def format_results(result: QueryResult, fmt: str, *, null: bool = False) -> str:
    """table | paths | json. Paths are printed as they are, except those holding control characters,
    which are quoted as bash $'...' (display.shown_path); `null`: bare paths, each ended by NUL, unchanged."""
    if fmt == "paths":
        if null:
            return "".join(h.path + "\0" for h in result.hits)
        return "\n".join(shown_path(h.path) for h in result.hits)
    if fmt == "json":
        return json.dumps({
            "query": result.query, "kind": result.kind, "space": result.space,
            **({"terms": result.terms.to_list()} if result.terms and result.kind == "combined" else {}),
            "results": [{"path": h.path, "score": None if h.score is None else round(h.score, 6),
                         **({"id": h.id} if h.id else {}), **({"taken": h.taken} if h.taken else {})}
                        for h in result.hits],
        }, indent=2, ensure_ascii=False)
    if not result.hits:
        return "no results"
    dated = any(h.taken for h in result.hits) and (result.kind == "filters" or result.sorted_by != "score")
    lines = [f"{'score':>6}  " + ("taken                " if dated else "") + "path"]
    lines += [("      " if h.score is None else f"{h.score:6.3f}") + "  " + (f"{h.taken or '':19}  " if dated else "")
              + shown_path(h.path) for h in result.hits]
    return "\n".join(lines)

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

from . import bundle as B
from .display import shown_path
from .encoders import Encoders
from .photo_search import (ENGLISH_FILES, IMAGE_FILES, TEXT_FILES, UNTRAINED_NOTE, QueryError, damage_note,
                           explain_no_hits, image_vector, open_reader, query_vector, reproject_if_stale, search_rows)
from .sessions import SessionFactory
from .terms import IMAGE, TEXT, QueryTerms, QueryTermsError, Term, looks_like_path, parse_terms





@dataclass
class Hit:
    path: str
    score: float
    id: str | None = None       # the photo's content id (id:... in query terms, /thumb/{id} in `uclip serve`)


@dataclass
class QueryResult:
    query: str
    kind: str                   # "text" | "image" | "combined" (several terms, or a weight)
    space: str                  # "shared" (trained heads) | "clip" (English / raw CLIP, no heads yet)
    hits: list[Hit] = field(default_factory=list)
    terms: QueryTerms | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
) -> QueryResult:
    """Search by `query`: text in any language, an image path, or terms combined (see uclip_cli.terms)."""
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    terms = read_terms(query, force_text=force_text)
    if top < 1:
        raise QueryError(f"--top {top}: give at least 1")
    bundle = B.load_bundle(bundle_path, verify="cached", only=())   # read-only: the cheap check suffices
    bundle.check_now((IMAGE_FILES if terms.has(IMAGE) else ()) + (
        (TEXT_FILES if bundle.has_heads else ENGLISH_FILES) if terms.has(TEXT) else ()))
    lap("bundle")
    encoders = Encoders(bundle, sessions, text_precision="auto")   # the faster text tower on this CPU
    result = QueryResult(query, terms.kind, encoders.space, terms=terms)
    if not bundle.has_heads and terms.has(TEXT):
        result.notes.append(UNTRAINED_NOTE)
    store = open_reader(index_path, bundle, sessions)
    if store.needs_reprojection:
        store.close()
        if note := reproject_if_stale(index_path, bundle_path, sessions):
            result.notes.append(note)
        store = open_reader(index_path, bundle, sessions)
        if store.needs_reprojection:   # the heads changed again meanwhile
            store.close()
            raise QueryError(f"the index {index_path} was projected with other heads than {bundle.path} has now: "
                             "run `uclip index` once to re-project it (no image is decoded)")
    with store:
        lap("index")
        vector, exclude_rows = query_vector(
            terms, store, encoders.encode_text_query,
            lambda path: image_vector(path, bundle, encoders, store))
        lap("encode")
        searched: dict = {}
        rows, scores = search_rows(store, vector, top, min_score=min_score,
                                   folder=folder.expanduser().resolve() if folder else None, exclude_rows=exclude_rows,
                                   exact=exact, info=searched)
        result.notes.extend([*store.notes, *filter(None, [damage_note(searched)])])
        paths = store.catalogue.paths_for_rows(rows.tolist())
        ids = store.catalogue.ids_for_rows(rows.tolist())
        if store.catalogue.damaged_records:
            result.notes.append(f"note: {store.catalogue.damaged_records} records of the index catalogue are damaged and were "
                                "left out: run `uclip check --repair`")
        query_paths = {str(Path(t.value).expanduser().resolve()) for t in terms.terms if t.kind == IMAGE}
        for row, score in zip(rows.tolist(), scores.tolist()):
            for path in paths.get(row, []):
                if path not in query_paths and len(result.hits) < top:
                    result.hits.append(Hit(path, float(score), ids.get(row)))
        if not result.hits:
            explain_no_hits(store, folder)
        lap("search")
    timings["encode"] -= sum(encoders.load_seconds.values())   # "encode" is tokenise + run alone
    result.timings = {**timings, **encoders.load_seconds}
    return result






def _exists(typed: str) -> bool:
    try:
        return Path(typed.removeprefix("file://")).expanduser().exists()
    except (OSError, ValueError):   # a name too long for the filesystem, a NUL: not a path
        return False






def read_terms(query: str, *, force_text: bool = False) -> QueryTerms:
    """The CLI's terms: a query that names an existing file or folder as a whole (spaces and all; a bare
    word too, as a shell user types `uclip query photos`) is that one image, so that a folder or a
    text file is an error that says so (--text searches for the words); anything else is read by the
    terms grammar, where "AC/DC concert" and "St. Vitus" stay text."""
    whole = query.strip()
    if not force_text and whole and _exists(whole) and (looks_like_path(whole) or not any(c.isspace() for c in whole)):
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
            "results": [{"path": h.path, "score": round(h.score, 6), **({"id": h.id} if h.id else {})}
                        for h in result.hits],
        }, indent=2, ensure_ascii=False)
    if not result.hits:
        return "no results"
    lines = [f"{'score':>6}  path"]
    lines += [f"{h.score:6.3f}  {shown_path(h.path)}" for h in result.hits]
    return "\n".join(lines)

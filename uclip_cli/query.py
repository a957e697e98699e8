"""`uclip query`: text (any language), an example image, or terms combined -> the best-matching indexed images.

The query string is read by uclip_cli.terms (one grammar for the CLI and `uclip serve`); `query_vector`
turns terms into one search vector and `search_rows` finds the best rows: both are shared with the server.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .display import shown_path
from .errors import UclipError
from .sessions import SessionFactory
from .store import IndexStore
from .terms import ID, IMAGE, TEXT, QueryTerms, QueryTermsError, Term, combine, looks_like_path, parse_terms

TEXT_FILES = (B.TEXT_MULTILINGUAL, B.HEAD_A, B.TOKENIZER_MULTILINGUAL)
ENGLISH_FILES = (B.TEXT_CLIP, B.TOKENIZER_CLIP)
IMAGE_FILES = (B.IMAGE_ENCODER, B.HEAD_B)
UNTRAINED_NOTE = ("note: the bundle has no trained heads yet, so text queries work in English only "
                  "(CLIP's text tower); run `uclip train` to search in other languages")


class QueryError(UclipError):
    """A query that cannot be run as given."""


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
    sessions: SessionFactory | None = None,
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
    bundle = B.load_bundle(bundle_path, verify=False)
    needed = (IMAGE_FILES if terms.has(IMAGE) else ()) + (
        (TEXT_FILES if bundle.has_heads else ENGLISH_FILES) if terms.has(TEXT) else ())
    bundle = B.load_bundle(bundle_path, verify="cached", only=needed)   # read-only: the cheap check suffices
    lap("bundle")
    encoders = Encoders(bundle, sessions or SessionFactory(one_shot=True))
    result = QueryResult(query, terms.kind, encoders.space, terms=terms)
    if not bundle.has_heads and terms.has(TEXT):
        result.notes.append(UNTRAINED_NOTE)
    store = _open_reader(index_path, bundle)
    if store.needs_reprojection:
        store.close()
        if note := reproject_if_stale(index_path, bundle_path, sessions):
            result.notes.append(note)
        store = _open_reader(index_path, bundle)
        if store.needs_reprojection:   # the heads changed again meanwhile
            store.close()
            raise QueryError(f"the index {index_path} was projected with other heads than {bundle.path} has now: "
                             "run `uclip index` once to re-project it (no image is decoded)")
    with store:
        lap("index")
        vector, exclude_rows = query_vector(
            terms, store, encoders.encode_text_query,
            lambda path: _image_vector(path, bundle, encoders, store))
        lap("encode")
        searched: dict = {}
        rows, scores = search_rows(store, vector, top, min_score=min_score,
                                   folder=folder.expanduser().resolve() if folder else None, exclude_rows=exclude_rows,
                                   exact=exact, info=searched)
        result.notes.extend([*store.notes, *filter(None, [damage_note(searched)])])
        paths = store.paths_for_rows(rows.tolist())
        ids = store.ids_for_rows(rows.tolist())
        if store.damaged_records:
            result.notes.append(f"note: {store.damaged_records} records of the index catalogue are damaged and were "
                                "left out: run `uclip check --repair`")
        query_paths = {str(Path(t.value).expanduser().resolve()) for t in terms.terms if t.kind == IMAGE}
        for row, score in zip(rows.tolist(), scores.tolist()):
            for path in paths.get(row, []):
                if path not in query_paths and len(result.hits) < top:
                    result.hits.append(Hit(path, float(score), ids.get(row)))
        if not result.hits:
            _explain_no_hits(store, folder)
        lap("search")
    timings["encode"] -= sum(encoders.load_seconds.values())   # "encode" is tokenise + run alone
    result.timings = {**timings, **encoders.load_seconds}
    return result


def reproject_if_stale(index_path: Path, bundle_path: Path, sessions: SessionFactory | None = None) -> str | None:
    """Re-project the index on the spot when its vectors were made with other heads than the bundle has now.

    After `uclip train` (or another bundle's heads) every stored vector is Head_B of the frozen features
    the index keeps: no image is decoded and 100,000 photos take well under a second. Returns a note for
    stderr, or None when nothing was stale. When the index cannot be written here (read-only, or another
    uclip process writing it), QueryError says so and what to run. Any command that reads vectors
    (query, serve) calls this before it searches.
    """
    from .store import IndexBusyError, IndexStoreError

    bundle = B.load_bundle(bundle_path, verify=False)
    with _open_reader(index_path, bundle) as store:
        if not store.needs_reprojection:
            return None
    stale = f"the index {index_path} was projected with other heads than {bundle.path} has now"
    if not _writable(Path(index_path).expanduser()):
        raise QueryError(f"{stale}, and it cannot be written here: run `uclip index` once where it can "
                         "(no image is decoded), or pass another --bundle")
    from .indexer import reproject_if_needed

    bundle = B.load_bundle(bundle_path, only=(B.HEAD_B,) if bundle.has_heads else ())
    encoders = Encoders(bundle, sessions or SessionFactory(one_shot=True))
    started = time.perf_counter()
    try:
        with IndexStore.open(index_path, create=False, image_fingerprint=bundle.image_fingerprint,
                             heads_fingerprint=bundle.heads_fingerprint, d_clip=bundle.dims["clip"],
                             d_search=encoders.search_dim, bundle_label=str(bundle.path)) as store:
            rows = reproject_if_needed(store, bundle, encoders)
    except IndexBusyError as e:
        raise QueryError(f"{stale}, and {e}; then search again (its run re-projects it)") from None
    except IndexStoreError as e:
        raise QueryError(f"{stale}, and it cannot be written here ({e}): run `uclip index` once where it can") from None
    return (f"re-projected the {rows} stored vectors of {index_path} for the heads now in {bundle.path} "
            f"({time.perf_counter() - started:.1f} s, no image decoded)")


def _explain_no_hits(store: IndexStore, folder: Path | None) -> None:
    """No result because nothing could match (an empty index, --in a folder it does not hold) is an error
    that says so; no result above --min-score stays an empty answer."""
    if store.stats().ok == 0:
        raise QueryError(f"the index {store.path} holds no photos yet: run `uclip index FOLDER` first")
    if folder is not None:
        under = folder.expanduser().resolve()
        mask = store.search_mask(under)
        if mask is not None and not mask.any():
            roots = store.roots()
            raise QueryError(f"--in {folder}: the index {store.path} holds no photo under it; its folders: "
                             + (", ".join(roots[:5]) + (f" and {len(roots) - 5} more" if len(roots) > 5 else "")))


def _exists(typed: str) -> bool:
    try:
        return Path(typed.removeprefix("file://")).expanduser().exists()
    except (OSError, ValueError):   # a name too long for the filesystem, a NUL: not a path
        return False


def _open_reader(index_path: Path, bundle: B.Bundle) -> IndexStore:
    store = IndexStore.open(index_path, readonly=True, image_fingerprint=bundle.image_fingerprint,
                            heads_fingerprint=bundle.heads_fingerprint, d_clip=bundle.dims["clip"],
                            bundle_label=str(bundle.path))
    if store.vectors_problem is not None:
        store.close()
        raise store.vectors_problem
    return store


def _writable(index_path: Path) -> bool:
    return os.access(index_path, os.W_OK | os.X_OK)


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


def query_vector(
    terms: QueryTerms,
    store: IndexStore,
    encode_texts: Callable[[list[str]], np.ndarray],
    image_path_vector: Callable[[Path], tuple[np.ndarray, int | None]] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The search vector of `terms`, and the index rows of the photos they name (left out of the results).

    Text terms are encoded in one batch by `encode_texts`; an id term takes its photo's stored vector;
    an image path term asks `image_path_vector` (None: paths are refused, as over HTTP).
    """
    vectors: list[np.ndarray | None] = [None] * len(terms.terms)
    rows: list[int] = []
    texts = [i for i, t in enumerate(terms.terms) if t.kind == TEXT]
    if texts:
        for i, vector in zip(texts, encode_texts([terms.terms[i].value for i in texts])):
            vectors[i] = vector
    for i, term in enumerate(terms.terms):
        if term.kind == ID:
            row = photo_row(store, term.value)
            if row is None:
                raise QueryError(f"no photo with id {term.value} in the index {store.path}: it was removed, "
                                 "or the id is from another index")
            vectors[i] = np.asarray(store.vectors()[row], dtype=np.float32)
            rows.append(row)
        elif term.kind == IMAGE:
            if image_path_vector is None:
                raise QueryError(f"{term.value}: image paths are not accepted here: name the photo by id")
            vectors[i], row = image_path_vector(_image_path(term.value))
            if row is not None:
                rows.append(row)
    try:
        vector = combine(np.stack(vectors), [t.weight for t in terms.terms])
    except QueryTermsError as e:
        raise QueryError(str(e)) from None
    return vector, rows


def photo_row(store: IndexStore, content_id: str) -> int | None:
    """The row of the indexed photo with this content id, or None when no indexed file holds it now."""
    if not store.paths_for_id(content_id):
        return None      # removed: its row may linger as dead until compaction, but it is no photo of the index
    row = store.find_by_hash(content_id)
    return row if row is not None and row < store.rows else None


def search_rows(
    store: IndexStore, vector: np.ndarray, k: int, *, min_score: float | None = None,
    folder: str | Path | None = None, exclude_rows: list[int] | tuple[int, ...] = (), exact: bool = False,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for `vector` (rows, scores), best first: live rows only, under `folder` when given,
    never the rows in `exclude_rows`; `exact`: never an approximate index. `info` as IndexStore.search
    fills it (info["damaged"]: rows left out as damaged; `damage_note` says it to the user)."""
    mask = store.search_mask(folder)
    excluded = [r for r in exclude_rows if r < store.rows]
    if excluded:
        mask = np.ones(store.rows, dtype=bool) if mask is None else mask.copy()
        mask[excluded] = False
    return store.search(vector, k, mask=mask, min_score=min_score, exact=exact, info=info)


def damage_note(info: dict) -> str | None:
    """What to tell the user when a search left out damaged rows (None when it did not)."""
    damaged = info.get("damaged") or []
    if not damaged:
        return None
    return (f"note: {len(damaged)} photo{'s' if len(damaged) > 1 else ''} in the index {'have' if len(damaged) > 1 else 'has'} "
            "damaged vectors and were left out: run `uclip check --repair` (computes them again from the stored image features)")


def _image_path(typed: str) -> Path:
    """The file an image term names, or a QueryError that says what is wrong with the path."""
    path = Path(typed.removeprefix("file://")).expanduser()
    if path.is_dir():
        raise QueryError(f"{typed} is a folder, not an image: search inside it with --in {typed}, "
                         "or pass --text to search for these words")
    if not path.is_file():
        raise QueryError(f"{typed} looks like an image path, but there is no such file: check the path, "
                         "or pass --text to search for these words")
    return path


def _image_vector(path: Path, bundle: B.Bundle, encoders: Encoders, store: IndexStore) -> tuple[np.ndarray, int | None]:
    """The example image's search vector, and its own row when it is indexed (so it is left out)."""
    from .pipeline import ListedFile, Preparer

    stored: dict[str, int] = {}

    def known(digest: str) -> bool:   # an indexed photo: its stored vector, nothing decoded
        row = store.find_by_hash(digest)
        if row is not None and row < store.rows:
            stored[digest] = row
        return digest in stored

    item = Preparer(bundle.image, known=known)(ListedFile(path, path.parent, 0, 0))
    if item.status == "failed":
        raise QueryError(f"cannot use {path} as a query image: {item.error}; "
                         "to search for these words as text, pass --text")
    if item.status == "known":
        row = stored[item.content_hash]
        return np.asarray(store.vectors()[row], dtype=np.float32), row
    return encoders.encode_image_query(item.pixels[None])[0], None


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

"""Searching an index for query terms, shared by `uclip query` (query.py) and `uclip serve` (serve/):
the search vector of terms (text in any language, an example image, a photo by id, combined), the rows
that answer (live rows, a folder, the query's own photos left out), and the index as a bundle searches it
(`open_searchable`: vectors of other heads are projected in memory, never written). Printing and the query string's CLI reading
stay with the command.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .errors import UclipError
from .index.access import open_index
from .index.identity import IndexIdentity
from .index.exact_index import ExactSearcher
from .index.search import search
from .index.photo_details import PhotoDetails
from .index.photo_tags import PhotoTags, vectors_model
from .index.records import PhotoFilter
from .index.store import IndexStore
from .terms import ID, IMAGE, TEXT, QueryTerms, QueryTermsError, combine


TEXT_FILES = (B.TEXT_MULTILINGUAL, B.HEAD_A, B.TOKENIZER_MULTILINGUAL)
ENGLISH_FILES = (B.TEXT_CLIP, B.TOKENIZER_CLIP)
IMAGE_FILES = (B.IMAGE_ENCODER, B.HEAD_B)
UNTRAINED_NOTE = ("note: the bundle has no trained heads yet, so text queries work in English only "
                  "(CLIP's text tower); run `uclip train` to search in other languages")


class QueryError(UclipError):
    """A query that cannot be run as given."""


class ProjectedIndex:
    """An index whose stored vectors are another heads' (`uclip train` since, or `--bundle OTHER`), searched
    through its stored image features projected by this bundle's Head_B in memory: a query never writes
    the index (a `uclip serve` on the first bundle keeps serving it; alternating bundles do not rewrite it),
    no photo is decoded, and `uclip index` stores the projection for good. The exact float32 pass answers
    (the int8 and approximate copies are the stored vectors'); everything else is the store's."""

    needs_reprojection = False
    vectors_problem = None

    def __init__(self, store: IndexStore, bundle: B.Bundle, encoders: Encoders, chunk_rows: int = 8192):
        started = time.perf_counter()
        features = store.features()
        d = IndexIdentity.of(bundle).d_search
        parts = [encoders.project_image(np.asarray(features[start:start + chunk_rows], dtype=np.float32))
                 for start in range(0, store.rows, chunk_rows)]
        self._vectors = np.concatenate(parts) if parts else np.empty((0, d), np.float32)
        self.store, self.catalogue = store, store.catalogue
        # tags scored against these projected vectors, not the stored ones (index/photo_tags.py)
        self.details = PhotoDetails(store.catalogue, PhotoTags(store.catalogue, bundle_model(bundle)))
        self.path, self.rows = store.path, store.rows
        self.unit_rows = True      # the encoders normalise what they project
        self._exact = ExactSearcher(self._vectors, None, unit=True)
        why = (f"its search vectors cannot be read ({store.vectors_problem})" if store.vectors_problem else
               f"the index {store.path} holds vectors of other heads than {bundle.path}")
        self.notes = [*store.notes, f"note: {why}: answered from its stored image features projected in memory "
                      f"({time.perf_counter() - started:.2f} s, no image decoded); `uclip index` stores them"]

    def vectors(self) -> np.ndarray:
        return self._vectors

    def searcher(self, kind: str):
        return self._exact if kind == "exact" else None

    def proven_rows(self) -> int:
        return len(self._vectors)        # computed just now, in memory: nothing on disk to fail

    def unsound(self, rows: np.ndarray) -> np.ndarray:
        return np.empty(0, np.int64)

    def stats(self):
        return self.store.stats()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ProjectedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bundle_model(bundle: B.Bundle) -> str:
    """The identity of the search vectors `bundle` makes (tags are scored against, and kept for, one)."""
    return vectors_model(bundle.image_fingerprint, bundle.heads_fingerprint)


def open_searchable(index_path: Path, bundle: B.Bundle, encoders: Encoders) -> IndexStore | ProjectedIndex:
    """The index as `bundle` searches it, read-only: the store, or (its vectors another heads', or lost while
    its features are whole) a ProjectedIndex over it. Never writes the index."""
    store = open_index(index_path, IndexIdentity.of(bundle), "read", sessions=encoders.sessions)
    if not store.needs_reprojection:
        return store
    try:
        return ProjectedIndex(store, bundle, encoders)
    except BaseException:
        store.close()
        raise


def explain_no_hits(store: IndexStore, folder: Path | None, photo_filter: PhotoFilter | None = None,
                    shown: str = "the filters") -> None:
    """No result because nothing could match (an empty index, --in a folder it does not hold, filters no photo
    passes) is an error that says so; no result above --min-score stays an empty answer."""
    if store.stats().ok == 0:
        raise QueryError(f"the index {store.path} holds no photos yet: run `uclip index FOLDER` first")
    if folder is not None:
        under = folder.expanduser().resolve()
        mask = store.catalogue.search_mask(under)
        if mask is not None and not mask.any():
            roots = store.catalogue.roots()
            raise QueryError(f"--in {folder}: the index {store.path} holds no photo under it; its folders: "
                             + (", ".join(roots[:5]) + (f" and {len(roots) - 5} more" if len(roots) > 5 else "")))
    if photo_filter is not None and not photo_filter.empty:
        passing = store.details.filter_mask(photo_filter)
        if not passing.any():
            raise QueryError(filter_miss(store, shown, photo_filter))
        inside = None if folder is None else store.catalogue.search_mask(folder.expanduser().resolve())
        if inside is not None and not (passing & inside).any():
            raise QueryError(f"no photo under --in {folder} passes {shown} ({int(passing.sum())} elsewhere in the "
                             "index do): widen or drop a filter, or leave out --in")


def filter_note(store: IndexStore, photo_filter: PhotoFilter | None) -> str | None:
    """A note when filters are given and some photos have no metadata (or tags) yet (so no filter passes them)."""
    if photo_filter is None or photo_filter.empty:
        return None
    if photo_filter.tags:      # (tags that cannot pass anything: filter_miss says why)
        untagged = 0 if store.details.tags.problem(photo_filter.tags) else store.details.tags.untagged()
        if untagged:
            return (f"note: {untagged} photos were indexed since the last `uclip tag` and hold no tags yet: run "
                    "`uclip tag` (scores them against the stored labels)")
        if not photo_filter.on_metadata:
            return None
    missing = store.details.undescribed()
    if not missing or not store.catalogue.described:
        return None      # none missing, or none read at all (filter_miss says that)
    return (f"note: {missing} photos have no date, camera or place in the index yet and pass no filter: "
            "run `uclip index` (reads them without embedding again)")


def filter_miss(store: IndexStore, shown: str, photo_filter: PhotoFilter | None = None) -> str:
    """The one line for filters that no photo of the index passes (a tag it does not hold: which, and why)."""
    problem = store.details.tags.problem(photo_filter.tags) if photo_filter is not None else None
    if problem:
        return problem
    if not store.catalogue.described and (photo_filter is None or photo_filter.on_metadata):
        return (f"{shown}: the index {store.path} holds no photo metadata yet (made before uclip kept it): "
                "run `uclip index` once (reads dates, cameras and places without embedding again)")
    return f"no photo in the index {store.path} passes {shown}: widen or drop a filter"


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
    if not store.catalogue.paths_for_id(content_id):
        return None      # removed: its row may linger as dead until compaction, but it is no photo of the index
    row = store.catalogue.find_by_hash(content_id)
    return row if row is not None and row < store.rows else None


def search_rows(
    store: IndexStore, vector: np.ndarray, k: int, *, min_score: float | None = None,
    folder: str | Path | None = None, exclude_rows: list[int] | tuple[int, ...] = (), exact: bool = False,
    info: dict | None = None, photo_filter: PhotoFilter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for `vector` (rows, scores), best first: live rows only, under `folder` when given,
    passing `photo_filter` when given (before the top-k: k rows that pass), never the rows in `exclude_rows`;
    `exact`: never an approximate index. `info` as index.search.search fills it (info["damaged"]: rows left
    out as damaged; `damage_note` says it to the user)."""
    mask = store.catalogue.search_mask(folder)
    if photo_filter is not None and not photo_filter.empty:
        passing = store.details.filter_mask(photo_filter)
        mask = passing if mask is None else mask & passing
    excluded = [r for r in exclude_rows if r < store.rows]
    if excluded:
        mask = np.ones(store.rows, dtype=bool) if mask is None else mask.copy()
        mask[excluded] = False
    return search(store, vector, k, mask=mask, min_score=min_score, exact=exact, info=info)


def by_date(store: IndexStore, rows: np.ndarray, scores: np.ndarray, newest_first: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rows (and their scores) in order of capture time, oldest first (or newest first); rows without a
    known time last, in the order given."""
    taken = store.details.taken_of(rows)
    known = np.flatnonzero(taken != "")
    order = known[np.argsort(taken[known], kind="stable")]
    if newest_first:
        order = order[::-1]
    index = np.concatenate([order, np.flatnonzero(taken == "")]).astype(np.int64)
    return np.asarray(rows)[index], np.asarray(scores)[index]


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


def image_vector(path: Path, bundle: B.Bundle, encoders: Encoders, store: IndexStore) -> tuple[np.ndarray, int | None]:
    """The example image's search vector, and its own row when it is indexed (so it is left out)."""
    from .image_pipeline import ListedFile, Preparer

    stored: dict[str, int] = {}

    def known(digest: str) -> bool:   # an indexed photo: its stored vector, nothing decoded
        row = store.catalogue.find_by_hash(digest)
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

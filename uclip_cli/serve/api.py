"""What each API request does: checked parameters in, plain dicts out (no HTTP here; app.py is the glue).

Every parameter comes from a stranger: each is checked before any work, and a bad one is a ServeError
with one line that names it and the accepted range (HTTP 400). Photos are named only by their id (the
content hash the catalogue keeps); a path from a request is never opened — `--in` folders only filter
catalogue rows by prefix, and only folders that the index holds are accepted.

Photo filters (filters.py) come as parameters (after, before, camera, near, within, gps=1,
shape=portrait|landscape, tag) or as words of `q` (after:2019-06 camera:pixel), read by the CLI's grammar and
applied before the top-k; `sort=date|newest` lists the best offset + top matches by capture time; `q` of
filter words alone lists the photos that pass, newest first. Each result carries its metadata (taken,
camera, lens, size, position) when the index has it.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..filters import SORTS, FilterError, api_filters, read_filters
from ..index.catalogue import CATALOG
from ..photo_search import by_date, filter_miss, filter_note, photo_row, query_vector, search_rows
from ..terms import QueryTermsError, parse_terms, split_filters
from .dupes_jobs import DupesJobs
from .live import Library, NotFound, ServeError, State, Unavailable
from .originals import IndexedFile, IndexedPhoto

DEFAULT_TOP = 50
MAX_UPLOAD_BYTES = 64 << 20  # POST /api/similar-upload's body: a 12 MP JPEG is ~5 MB, as PNG ~20-30 MB
UPLOAD_DECODES = threading.BoundedSemaphore(2)   # uploads decoded at once: each may hold up to MAX_PIXELS x 3 bytes
MAX_TOP = 200               # results per page
MAX_DEPTH = 10_000          # offset + top: how deep a client may page
MAX_FOLDER_CHARS = 4096
_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Page:
    top: int = DEFAULT_TOP
    offset: int = 0
    min_score: float | None = None
    folder: str | None = None
    filters: tuple = ()          # (key, value, shown) triples of the filter parameters (filters.api_filters)
    sort: str = "score"


def page_options(params: Mapping[str, str]) -> Page:
    """`top`, `offset`, `min_score` and `in` from a request's query parameters."""
    top = _integer(params, "top", DEFAULT_TOP, 1, MAX_TOP)
    offset = _integer(params, "offset", 0, 0, MAX_DEPTH - 1)
    if offset + top > MAX_DEPTH:
        raise ServeError(f"offset {offset} + top {top} goes past result {MAX_DEPTH}: narrow the query instead")
    min_score = None
    raw = params.get("min_score", "")
    if raw.strip():
        try:
            min_score = float(raw)
        except ValueError:
            raise ServeError(f"min_score={raw[:40]!r} is not a number: give a cosine between -1 and 1") from None
        if not (math.isfinite(min_score) and -1.0 <= min_score <= 1.0):
            raise ServeError(f"min_score={raw[:40]!r}: give a cosine between -1 and 1")
    folder = params.get("in", "").strip() or None
    if folder is not None:
        if len(folder) > MAX_FOLDER_CHARS or "\x00" in folder or not folder.startswith("/"):
            raise ServeError(f"in={folder[:80]!r}: give the absolute path of an indexed folder")
        folder = os.path.normpath(folder)
    return Page(top, offset, min_score, folder, *_filter_options(params))


def _filter_options(params: Mapping[str, str]) -> tuple[tuple, str]:
    """The photo filters (after, before, camera, near, within, gps, shape) and `sort` of a request, checked."""
    sort = params.get("sort", "").strip() or "score"
    if sort not in SORTS:
        raise ServeError(f"sort={sort[:40]!r}: give {', '.join(SORTS)}")
    try:
        given = tuple(api_filters(params))
        read_filters(given)
    except FilterError as e:
        raise ServeError(str(e)) from None
    return given, sort


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name, "")
    if not raw.strip():
        return default
    if not re.fullmatch(r"\s*\d{1,9}\s*", raw):
        raise ServeError(f"{name}={raw[:40]!r} is not a whole number: give {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise ServeError(f"{name}={value}: give {low} to {high}")
    return value


def check_id(text: str) -> str:
    """A photo id as results carry it (32 lower-case hex digits), or NotFound."""
    if not _ID_RE.fullmatch(text):
        raise NotFound(f"no photo has the id {text[:80]!r}: ids are 32 hex digits, as results carry them")
    return text


# ------------------------------------------------------------------------------------------ requests

def search(library: Library, query: str, page: Page) -> dict:
    """GET /api/search: text in any language, or terms (id:... photos, weights, + and -)."""
    rest, found = split_filters(query)
    try:
        photo_filter = read_filters([*page.filters, *found]) if page.filters or found else None
        terms = parse_terms(rest, allow_paths=False) if rest.strip() or not (found or page.filters) else None
    except (QueryTermsError, FilterError) as e:
        raise ServeError(str(e)) from None
    page = replace(page, filters=(*page.filters, *found))
    if terms is None:
        return _filters_alone(library, query, page, photo_filter)
    with library.use() as state:
        started = time.perf_counter()
        texts = [t.value for t in terms.texts]
        encoded = state.heads.text_vectors(texts) if texts else None     # outside the lock: sessions are thread-safe
        encoded_at = time.perf_counter()
        with state.lock:
            vector, exclude = query_vector(terms, state.store, lambda _: encoded)
            out = _results(state, vector, page, exclude)
        out["query"] = {"q": query, "kind": terms.kind, "terms": terms.to_list(), "read_as": str(terms)}
        out["timings_ms"] = {"encode": round(1000 * (encoded_at - started), 2),
                             "search": round(1000 * (time.perf_counter() - encoded_at), 2)}
        return out


def similar(library: Library, content_id: str, page: Page) -> dict:
    """GET /api/similar/{id}: "more like this" photo, the photo itself left out."""
    content_id = check_id(content_id)
    with library.use() as state:
        started = time.perf_counter()
        with state.lock:
            row = photo_row(state.store, content_id)
            if row is None:
                raise NotFound(f"no photo with id {content_id} in the index: it was removed or re-indexed")
            vector = np.asarray(state.store.vectors()[row], dtype=np.float32)
            out = _results(state, vector, page, [row])
        out["query"] = {"similar": content_id, "kind": "image"}
        out["timings_ms"] = {"encode": 0.0, "search": round(1000 * (time.perf_counter() - started), 2)}
        return out


def similar_upload(library: Library, data: bytes, page: Page) -> dict:
    """POST /api/similar-upload: "more like this" for a photo sent as the request body (app.py reads at most
    MAX_UPLOAD_BYTES of it). Decoded from memory with the indexer's checks (images.decode_image: format by
    signature, the pixel cap before any pixel, damage as one line), never written anywhere. Bytes that an
    indexed file holds use its stored vector and that photo is not left out: it comes first, as a match."""
    from ..image_pipeline import hash_bytes
    from ..images import ImageDecodeError, decode_image, preprocess   # Pillow: only when a photo is sent

    if not data:
        raise ServeError("the request body is empty: POST the photo's bytes (JPEG, PNG, WebP, HEIC, ...) as the body")
    digest = hash_bytes(data)
    with library.use() as state:
        started = time.perf_counter()
        with state.lock:
            row = photo_row(state.store, digest)
            vector = None if row is None else np.asarray(state.store.vectors()[row], dtype=np.float32)
        if vector is None:     # decode + encode outside the lock: sessions are thread-safe
            with UPLOAD_DECODES:
                try:
                    image = decode_image(data, name="the uploaded photo", target_size=state.bundle.image.size)
                except ImageDecodeError as e:
                    raise ServeError(f"the uploaded photo cannot be used: {e.reason}") from None
                del data
                pixels = preprocess(image, state.bundle.image)
                del image
            vector = state.heads.encoders.encode_image_query(pixels[None])[0]
        encoded_at = time.perf_counter()
        with state.lock:
            out = _results(state, vector, page, [])
        out["query"] = {"upload": digest, "kind": "image", "indexed": row is not None}
        out["timings_ms"] = {"encode": round(1000 * (encoded_at - started), 2),
                             "search": round(1000 * (time.perf_counter() - encoded_at), 2)}
        return out


def status(library: Library) -> dict:
    """GET /api/status: what is served, and whether other languages work yet."""
    with library.use() as state:
        bundle = state.bundle
        with state.lock:
            stats = state.store.stats()
            roots = state.store.catalogue.roots()
        if not (library.index_path / CATALOG).is_file():
            # searches still answer from the snapshot held open; the status must not pretend it is current
            raise Unavailable(f"the index {library.index_path} is gone (moved or deleted while serving): "
                              "restart `uclip serve` with --index at its new place, or run `uclip index`")
        return {
            "index": {"path": str(library.index_path), "photos": stats.ok, "skipped": stats.errors,
                      "rows": stats.rows, "roots": roots},
            "bundle": {"path": str(library.bundle_path), "fingerprint": bundle.fingerprint,
                       "heads_trained": bundle.has_heads, "space": state.heads.encoders.space,
                       "sources": bundle.manifest.get("sources", {})},
            "providers": state.heads.encoders.loaded_providers(),
            "notes": list(state.notes),
            "snapshot": {"taken_at": round(state.made_at, 3), "reloads": library.reloads},
        }


def dupes(library: Library, params: Mapping[str, str], jobs: DupesJobs) -> dict:
    """GET /api/dupes?threshold=&in=&top=: groups of near-duplicate photos (dupes.find_dupes: the frozen image
    features within a cosine threshold), largest first, the top groups of them; nothing is ever deleted.
    Computed in `jobs`' worker without the state's lock around the pair search, once per snapshot and
    question (serve/dupes_jobs.py): searches are answered meanwhile."""
    from ..dupes import DEFAULT_THRESHOLD, DupesError, check_threshold

    raw = params.get("threshold", "").strip()
    try:
        threshold = check_threshold(float(raw) if raw else DEFAULT_THRESHOLD, "threshold")
    except ValueError:
        raise ServeError(f"threshold={raw[:40]!r} is not a number: give a cosine from 0.5 to 1") from None
    except DupesError as e:
        raise ServeError(str(e)) from None
    top = _integer(params, "top", DEFAULT_TOP, 1, MAX_TOP)
    folder = page_options({"in": params.get("in", "")}).folder
    with library.use() as state:
        key = (state.serial, threshold, folder)
    found = jobs.answer(key, lambda progress: _dupes_now(library, threshold, folder, jobs.find, progress))
    out = {**found, "groups": found["groups"][:top], "more": len(found["groups"]) > top}
    for group in out["groups"]:
        for member in group["members"]:
            if member["id"]:
                member["thumb"], member["image"] = f"/thumb/{member['id']}", f"/image/{member['id']}"
    return out


def _dupes_now(library: Library, threshold: float, folder: str | None, find, progress) -> dict:
    """The dupes answer for the current snapshot, computed here (in the jobs' worker thread)."""
    from ..dupes import DupesError, find_dupes

    with library.use() as state:
        if folder is not None:
            with state.lock:
                _check_folder(folder, state.store.catalogue.roots())
        try:
            result = find_dupes(state.store, threshold, folder, lock=state.lock, find=find, progress=progress)
        except DupesError as e:
            raise ServeError(str(e)) from None
        return {**result.to_dict(), "notes": list(state.notes)}


def tags(library: Library) -> dict:
    """GET /api/tags: the labels `uclip tag` gave, with how many photos hold each (tags.tags_listing)."""
    from ..tags import tags_listing

    with library.use() as state, state.lock:
        out = tags_listing(state.store.details.tags, state.store.stats().ok)
    out["notes"] = list(state.notes)
    return out


def photo(library: Library, content_id: str) -> IndexedPhoto:
    """The photo with this id as indexed (its files' recorded size and mtime, the index's folders), for /image
    and /thumb (originals.py checks a file against these before any byte is sent), or NotFound."""
    content_id = check_id(content_id)
    with library.use() as state, state.lock:
        catalogue = state.store.catalogue
        files = []
        for path in catalogue.paths_for_id(content_id):
            record = catalogue.lookup(path)
            if record is not None and record.content_hash == content_id:
                files.append(IndexedFile(record.path, record.size, record.mtime_ns))
        roots = tuple(catalogue.roots())
    if not files:
        raise NotFound(f"no photo with id {content_id} in the index")
    return IndexedPhoto(content_id, tuple(files), roots)


# ------------------------------------------------------------------------------------------ results

def _results(state: State, vector: np.ndarray, page: Page, exclude_rows: list[int]) -> dict:
    """One page of results (under the state's lock): ids, scores, paths, and whether more follow."""
    store = state.store
    if page.folder is not None:
        _check_folder(page.folder, store.catalogue.roots())
    want = page.offset + page.top
    photo_filter = read_filters(page.filters) if page.filters else None
    rows, scores = search_rows(store, vector, want + 1, min_score=page.min_score, folder=page.folder,
                               exclude_rows=exclude_rows, photo_filter=photo_filter)
    more = len(rows) > want
    rows, scores = rows[:want], scores[:want]
    if page.sort != "score":     # the best offset + top matches, by capture time
        rows, scores = by_date(store, rows, scores, newest_first=page.sort == "newest")
    out = _listed(state, rows[page.offset:want], scores[page.offset:want].tolist(), page)
    out["more"] = more
    if not len(rows) and photo_filter is not None and not store.details.filter_mask(photo_filter).any():
        out["notes"].append(filter_miss(store, " ".join(f[2] for f in page.filters), photo_filter))   # an answer, not an error
    out["notes"] += filter(None, [filter_note(store, photo_filter)])
    return out


def _listed(state: State, rows: np.ndarray, scores: list, page: Page) -> dict:
    """Rows as results (score None: filters alone), with ids, paths and metadata."""
    store = state.store
    ids, paths = store.catalogue.ids_and_paths_for_rows(rows.tolist())
    described = store.details.metadata_for_rows(rows.tolist())
    results = []
    for row, score in zip(rows.tolist(), scores):
        if row not in ids:
            continue
        where = paths.get(row, [])
        if page.folder is not None:    # the copy inside the folder first
            where = sorted(where, key=lambda p: not p.startswith(page.folder.rstrip("/") + "/"))
        first = where[0] if where else ""
        results.append({
            "id": ids[row], "score": None if score is None else round(float(score), 6), "path": first, "paths": where,
            "name": os.path.basename(first), "folder": os.path.dirname(first),
            "thumb": f"/thumb/{ids[row]}", "image": f"/image/{ids[row]}",
            **_described(described.get(row)),
        })
    notes = list(state.notes)
    return {"results": results, "offset": page.offset, "more": False, "space": state.heads.encoders.space,
            "notes": notes}


def _described(meta) -> dict:
    """A result's metadata fields: taken (local time), taken_source, camera, lens, width, height, lat, lon."""
    if meta is None:
        return {}
    return {"taken": meta.taken, "taken_source": meta.taken_source, "camera": meta.camera or None, "lens": meta.lens,
            "width": meta.width, "height": meta.height, "lat": meta.lat, "lon": meta.lon}


def _filters_alone(library: Library, query: str, page: Page, photo_filter) -> dict:
    """A query of filter words alone: the photos that pass, by capture time (newest first unless sort=date)."""
    with library.use() as state:
        started = time.perf_counter()
        with state.lock:
            store = state.store
            mask = store.details.filter_mask(photo_filter)
            within = store.catalogue.search_mask(page.folder)
            rows = np.flatnonzero(mask if within is None else mask & within)
            rows, _ = by_date(store, rows, np.zeros(len(rows), np.float32), newest_first=page.sort != "date")
            out = _page_of(state, rows, page)
            if not mask.any():
                out["notes"].append(filter_miss(store, " ".join(f[2] for f in page.filters), photo_filter))
            out["notes"] += filter(None, [filter_note(store, photo_filter)])
        out["query"] = {"q": query, "kind": "filters", "terms": [], "read_as": ""}
        out["timings_ms"] = {"encode": 0.0, "search": round(1000 * (time.perf_counter() - started), 2)}
        return out


def _page_of(state: State, rows: np.ndarray, page: Page) -> dict:
    want = page.offset + page.top
    shown = rows[page.offset:want]
    out = _listed(state, shown, [None] * len(shown), page)
    out["more"] = len(rows) > want
    return out


def _check_folder(folder: str, roots: list[str]) -> None:
    inside = [r for r in roots if _within(folder, r) or _within(r, folder)]
    if not inside:
        shown = ", ".join(roots[:5]) + (" ..." if len(roots) > 5 else "")
        raise ServeError(f"in={folder!r} is not an indexed folder (indexed: {shown or 'none yet'})")


def _within(path: str, folder: str) -> bool:
    folder = folder.rstrip("/") + "/"
    return (path.rstrip("/") + "/").startswith(folder)

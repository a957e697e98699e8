"""`uclip query`: one text (any language) or one example image -> the best-matching indexed images."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .errors import UclipError
from .sessions import SessionFactory
from .store import IndexStore
from .walk import is_image_name

TEXT_FILES = (B.TEXT_MULTILINGUAL, B.HEAD_A, B.TOKENIZER_MULTILINGUAL)
ENGLISH_FILES = (B.TEXT_CLIP, B.TOKENIZER_CLIP)
IMAGE_FILES = (B.IMAGE_ENCODER, B.HEAD_B)


class QueryError(UclipError):
    """A query that cannot be run as given."""


@dataclass
class Hit:
    path: str
    score: float


@dataclass
class QueryResult:
    query: str
    kind: str                   # "text" | "image"
    space: str                  # "shared" (trained heads) | "clip" (English / raw CLIP, no heads yet)
    hits: list[Hit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def is_image_query(query: str, force_text: bool) -> bool:
    if force_text:
        return False
    path = Path(query).expanduser()
    if not path.suffix:   # plain text: known without loading Pillow
        return False
    return is_image_name(path.name) and path.is_file()


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
) -> QueryResult:
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    if not query.strip():
        raise QueryError("the query is empty: give text in any language, or the path of an image")
    if top < 1:
        raise QueryError(f"--top {top}: give at least 1")
    image = is_image_query(query, force_text)
    bundle = B.load_bundle(bundle_path, verify=False)
    needed = IMAGE_FILES if image else (TEXT_FILES if bundle.has_heads else ENGLISH_FILES)
    bundle = B.load_bundle(bundle_path, only=needed)
    lap("bundle")
    encoders = Encoders(bundle, sessions or SessionFactory(one_shot=True))
    result = QueryResult(query, "image" if image else "text", encoders.space)
    if not bundle.has_heads and not image:
        result.notes.append("note: the bundle has no trained heads yet, so text queries work in English only "
                            "(CLIP's text tower); run `uclip train` to search in other languages")
    with IndexStore.open(index_path, readonly=True, image_fingerprint=bundle.image_fingerprint,
                         heads_fingerprint=bundle.heads_fingerprint, d_clip=bundle.dims["clip"],
                         bundle_label=str(bundle.path)) as store:
        if store.needs_reprojection:
            raise QueryError(f"the index {index_path} was projected with other heads than {bundle.path} has now: "
                             "run `uclip index` once to re-project it (no image is decoded)")
        lap("index")
        exclude_row = None
        if image:
            vector, exclude_row = _image_vector(Path(query).expanduser(), bundle, encoders, store)
        else:
            vector = encoders.encode_text_query([query])[0]
        lap("encode")
        mask = store.search_mask(folder.expanduser().resolve() if folder else None)
        if exclude_row is not None and exclude_row < store.rows:
            mask = np.ones(store.rows, dtype=bool) if mask is None else mask.copy()
            mask[exclude_row] = False
        rows, scores = store.search(vector, top, mask=mask, min_score=min_score)
        paths = store.paths_for_rows(rows.tolist())
        query_path = str(Path(query).expanduser().resolve()) if image else None
        for row, score in zip(rows.tolist(), scores.tolist()):
            for path in paths.get(row, []):
                if path != query_path and len(result.hits) < top:
                    result.hits.append(Hit(path, float(score)))
        lap("search")
    timings["encode"] -= sum(encoders.load_seconds.values())   # "encode" is tokenise + run alone
    result.timings = {**timings, **encoders.load_seconds}
    return result


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
        raise QueryError(f"cannot use {path} as a query image: {item.error}")
    if item.status == "known":
        row = stored[item.content_hash]
        return np.asarray(store.vectors()[row], dtype=np.float32), row
    return encoders.encode_image_query(item.pixels[None])[0], None


def format_results(result: QueryResult, fmt: str) -> str:
    if fmt == "paths":
        return "\n".join(h.path for h in result.hits)
    if fmt == "json":
        return json.dumps({
            "query": result.query, "kind": result.kind, "space": result.space,
            "results": [{"path": h.path, "score": round(h.score, 6)} for h in result.hits],
        }, indent=2, ensure_ascii=False)
    if not result.hits:
        return "no results"
    lines = [f"{'score':>6}  path"]
    lines += [f"{h.score:6.3f}  {h.path}" for h in result.hits]
    return "\n".join(lines)

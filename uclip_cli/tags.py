"""`uclip tag`: labels in any language given to the indexed photos by zero-shot scoring, each label with a
threshold calibrated from the library itself; `uclip tags` and GET /api/tags list them.

    uclip tag "pláž, hory, kočka, jídlo"      # new labels are scored against every photo
    uclip tag --file labels.txt               # one label per line, any language mix
    uclip tag                                 # the stored labels, applied to photos indexed since
    uclip query "tag:kočka"  /  uclip query "na gauči" --tag kočka

Scoring. A label is a query: its text goes through the query path (Encoders.encode_text_query: the
multilingual tower and Head_A, fp32) and is scored against the stored search vectors, as `uclip query` scores
it. Raw cosines do not compare across labels or photos: some photos sit close to any text (hubs), and each
label's cosines have their own offset. So each photo's score is taken relative to *neutral prompts*
("a photo", "an image", ...): score = cos(photo, label) - mean over neutral prompts of cos(photo, neutral)
= photo . (label - mean neutral): a linear direction per label (stored with the label, so photos indexed
later are scored without a text tower). Score > 0 reads "more like this label than like any photo".

Threshold, per label, with no labels from the user: from the label's own score distribution over the
library. Most labels fit a minority of a library, so the bulk of the scores is the "not this" population;
its centre and spread are estimated robustly (median, 1.4826 x median absolute deviation: the minority that
does fit barely moves them), and a photo is given the label when its score stands out of that bulk:
threshold = max(MIN_SCORE, median + SPREADS x robust spread). MIN_SCORE keeps a label off photos that are no
closer to it than to "a photo" even when the bulk is tight. Below MIN_PHOTOS photos the spread is not
estimated (it would be noise): the threshold is MIN_SCORE. Labels are thresholded independently (no margin
against the other labels): a photo may hold several, and adding a label never changes which photos hold
the others, which is what makes a re-run incremental.

Alternatives measured on real photos and real weights (bench/README.md, "issue 23: tags"): a fixed cosine
threshold (cannot suit every label and every model), z-scores of the raw cosine (hubs pass every label),
the neutral margin alone (MIN_SCORE, no spread: many false positives), and the argmax over the user's labels
(one label per photo, and every photo gets one). The robust margin had the best F1 there.

Incremental. A label's threshold is fixed when it is scored (the first `uclip tag` that names it); photos
indexed later are scored against the stored directions and thresholds (`uclip tag` with no labels), new labels
only are scored when more are named, and a label of other vectors (the index re-projected after `uclip
train`, or another bundle) is scored again from its text. Tags live in the catalogue (index/photo_tags.py),
keyed by content hash and the vectors' identity. Nothing here deletes a photo or a record.
"""
from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .errors import UclipError
from .index.access import open_index
from .index.identity import IndexIdentity
from .index.photo_tags import Given, Label, PhotoTags, label_key
from .photo_search import ENGLISH_FILES, TEXT_FILES, ProjectedIndex, bundle_model
from .sessions import SessionFactory

NEUTRAL_PROMPTS = ("a photo", "a picture", "an image", "a photo of something", "a snapshot")
SPREADS = 3.0          # how many robust spreads above the library's median a photo must score
MIN_SCORE = 0.0        # never below: no closer to the label than to the neutral prompts
MIN_PHOTOS = 8         # fewer photos: threshold MIN_SCORE (a spread of so few is noise)
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal distribution is 0.6745 sigma
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
CHUNK_ROWS = 65536


class TagError(UclipError):
    """`uclip tag` cannot run as asked; the message names the argument and says what to do."""


@dataclass
class LabelResult:
    label: str
    photos: int                # live photos holding it after this run
    threshold: float
    action: str                # "new" | "rescored" (other vectors) | "kept" (stored; new photos scored) | "removed"


@dataclass
class TagSummary:
    photos: int                # live photos in the index
    scored_photos: int         # photos scored in this run against labels they had not been scored against
    labels: list[LabelResult] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"photos": self.photos, "scored_photos": self.scored_photos, "seconds": round(self.seconds, 3),
                "labels": [vars(x) for x in self.labels]}


def read_labels(text: str | None = None, file: Path | None = None) -> list[str]:
    """The labels of `uclip tag "a, b, c"` (commas) and of --file (one per line), NFC, trimmed, each once
    (case-insensitively); TagError names the argument when one is empty, too long or unreadable."""
    given: list[tuple[str, str]] = []
    if text is not None:
        given += [(part, "LABELS") for part in text.split(",")]
    if file is not None:
        try:
            lines = Path(file).expanduser().read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise TagError(f"--file {file}: not UTF-8 text: save it as UTF-8, one label per line") from None
        except OSError as e:
            raise TagError(f"--file {file}: cannot read it ({e.strerror}): give a text file, one label per line") from None
        given += [(line, f"--file {file}") for line in lines]
    labels: dict[str, str] = {}
    for raw, source in given:
        label = unicodedata.normalize("NFC", raw).strip()
        if not label:
            continue
        if len(label) > MAX_LABEL_CHARS or any(unicodedata.category(c) == "Cc" for c in label):
            raise TagError(f"{source}: the label {label[:40]!r}... is not a short line of text: give labels of at "
                           f"most {MAX_LABEL_CHARS} characters")
        labels.setdefault(label_key(label), label)
    if (text is not None or file is not None) and not labels:
        where = f"--file {file}" if file is not None else "LABELS"
        raise TagError(f"{where}: no label in it: give labels separated by commas, e.g. uclip tag \"beach, mountains, "
                       "cat\", or a file with one label per line")
    if len(labels) > MAX_LABELS:
        raise TagError(f"{len(labels)} labels: give at most {MAX_LABELS}")
    return list(labels.values())


def calibrate(scores: np.ndarray) -> float:
    """A label's threshold from its scores over the library (module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < MIN_PHOTOS:
        return MIN_SCORE
    centre = float(np.median(scores))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(scores - centre)))
    return max(MIN_SCORE, centre + SPREADS * spread)


def label_directions(encoders: Encoders, labels: Sequence[str]) -> np.ndarray:
    """Each label's scoring direction [n, d]: its query vector less the mean of the neutral prompts' vectors."""
    encoded = encoders.encode_text_query([*labels, *NEUTRAL_PROMPTS])
    return (encoded[:len(labels)] - encoded[len(labels):].mean(axis=0)).astype(np.float32)


def scores_of(vectors: np.ndarray, rows: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Scores [len(rows), n labels] of these rows' vectors, a chunk of rows at a time."""
    out = np.empty((len(rows), len(directions)), np.float32)
    for start in range(0, len(rows), CHUNK_ROWS):
        part = np.asarray(vectors[rows[start:start + CHUNK_ROWS]], dtype=np.float32)
        out[start:start + len(part)] = part @ directions.T
    return out


def run_tag(index_path: Path, bundle_path: Path, sessions: SessionFactory, labels: Sequence[str] = (), *,
            remove: Sequence[str] = (), clear: bool = False, log: Callable[[str], None] = lambda _: None) -> TagSummary:
    """Score `labels` (new ones; those already stored are kept) and apply every stored label to the photos not
    scored yet; or drop labels (`remove`) or all of them (`clear`). Holds the index's writer lock."""
    started = time.perf_counter()
    if (remove or clear) and labels:
        raise TagError("give labels to add, or --remove / --clear, not both in one run")
    bundle = B.load_bundle(bundle_path, verify="cached", only=())
    encoders = Encoders(bundle, sessions, text_precision="fp32")
    store = open_index(index_path, IndexIdentity.of(bundle), "write", sessions=sessions)
    with store:
        tags = PhotoTags(store.catalogue, bundle_model(bundle))
        stored = {label.key: label for label in tags.labels()}
        if clear or remove:
            return _drop(tags, stored, remove, clear, started)
        if not labels and not stored:
            raise TagError("no labels yet: give some, e.g. uclip tag \"beach, mountains, cat\" (any language), or "
                           "--file with one label per line")
        hashes = {r.row: r.content_hash for r in store.catalogue.records() if r.row is not None and r.row < store.rows}
        rows = np.array(sorted(hashes), dtype=np.int64)
        if not len(rows):
            raise TagError(f"the index {store.path} holds no photos yet: run `uclip index FOLDER` first")
        fresh = {label_key(x): x for x in labels if label_key(x) not in stored or stored[label_key(x)].model != tags.model}
        fresh.update({k: x.label for k, x in stored.items() if x.model != tags.model and k not in fresh})
        kept = [x for k, x in stored.items() if k not in fresh]
        source = ProjectedIndex(store, bundle, encoders) if store.needs_reprojection else store
        vectors = source.vectors()
        given: list[Given] = []
        if fresh:
            bundle.check_now(TEXT_FILES if bundle.has_heads else ENGLISH_FILES)
            directions = label_directions(encoders, list(fresh.values()))
            scores = scores_of(vectors, rows, directions)
            for (key, text), direction, column in zip(fresh.items(), directions, scores.T):
                label = Label(key, text, tags.model, calibrate(column), direction)
                given.append(Given(label, _passing(rows, hashes, column, label.threshold), replace=True))
        done = tags.scored()
        todo = np.array([r for r in rows.tolist() if hashes[r] not in done], dtype=np.int64)
        if kept and len(todo):
            scores = scores_of(vectors, todo, np.stack([x.vector for x in kept]))
            given += [Given(x, _passing(todo, hashes, column, x.threshold), replace=False)
                      for x, column in zip(kept, scores.T)]
        tags.commit(given, [hashes[r] for r in rows.tolist()])
        counts = {x.key: x.photos for x in tags.labels()}
        actions = {k: ("rescored" if k in stored else "new") for k in fresh}
        summary = TagSummary(len(rows), len(rows) if fresh else len(todo), seconds=time.perf_counter() - started)
        summary.labels = [LabelResult(x.label, counts.get(x.key, 0), round(x.threshold, 6), actions.get(x.key, "kept"))
                          for x in [*(g.label for g in given if g.replace), *kept]]
        summary.labels.sort(key=lambda x: (-x.photos, label_key(x.label)))
        return summary


def _passing(rows: np.ndarray, hashes: dict[int, str], scores: np.ndarray, threshold: float) -> list[tuple[str, float]]:
    return [(hashes[int(r)], float(s)) for r, s in zip(rows, scores) if s > threshold]


def _drop(tags: PhotoTags, stored: dict[str, Label], remove: Sequence[str], clear: bool, started: float) -> TagSummary:
    """`--remove LABEL` / `--clear`: the labels and their tags go, every photo stays."""
    if clear:
        tags.clear()
        gone = list(stored.values())
    else:
        keys = list(dict.fromkeys(label_key(x) for x in remove))
        unknown = [k for k in keys if k not in stored]
        if unknown:
            known = ", ".join(sorted(stored)[:10]) or "none yet"
            raise TagError(f"--remove {unknown[0]}: no such label in the index (its labels: {known}); nothing removed")
        tags.remove(keys)
        gone = [stored[k] for k in keys]
    summary = TagSummary(0, 0, seconds=time.perf_counter() - started)
    summary.labels = [LabelResult(x.label, 0, round(x.threshold, 6), "removed") for x in gone]
    return summary


def list_tags(index_path: Path, bundle_path: Path) -> dict:
    """`uclip tags`: the stored labels with the photos holding each, as the bundle's vectors see them (a label
    scored for other vectors is listed as stale)."""
    bundle = B.load_bundle(bundle_path, verify="cached", only=())
    with open_index(index_path, mode="read") as store:
        return tags_listing(PhotoTags(store.catalogue, bundle_model(bundle)), store.stats().ok)


def tags_listing(tags: PhotoTags, photos: int) -> dict:
    """The listing of `uclip tags --format json` and GET /api/tags."""
    labels = tags.labels()
    return {"photos": photos, "untagged": tags.untagged() if labels else None,
            "labels": [{"label": x.label, "photos": x.photos, "threshold": round(x.threshold, 6),
                        "stale": x.model != tags.model} for x in labels]}


def format_summary(summary: TagSummary) -> str:
    if summary.labels and all(x.action == "removed" for x in summary.labels):
        return "\n".join(f"removed the label {x.label!r} (every photo stays)" for x in summary.labels)
    lines = [f"{'photos':>6}  {'threshold':>9}  label"]
    lines += [f"{x.photos:6d}  {x.threshold:9.4f}  {x.label}" + ("" if x.action == "kept" else f"  ({x.action})")
              for x in summary.labels]
    lines.append(f"{summary.photos} photos, {summary.scored_photos} scored now, {summary.seconds:.1f} s")
    return "\n".join(lines)


def format_listing(listing: dict) -> str:
    if not listing["labels"]:
        return "no tags yet: give some with `uclip tag \"beach, mountains, cat\"` (any language)"
    lines = [f"{'photos':>6}  label"]
    lines += [f"{x['photos']:6d}  {x['label']}" + ("  (stale: run `uclip tag`)" if x["stale"] else "")
              for x in listing["labels"]]
    if listing["untagged"]:
        lines.append(f"{listing['untagged']} of {listing['photos']} photos not tagged yet: run `uclip tag`")
    return "\n".join(lines)

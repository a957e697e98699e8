"""`uclip tag`: labels in any language given to the indexed photos by zero-shot scoring, each label with a
threshold calibrated from the library itself; `uclip tags` and GET /api/tags list them.

    uclip tag "pláž, hory, kočka, jídlo"      # new labels are scored against every photo
    uclip tag --file labels.txt               # one label per line, any language mix
    uclip tag                                 # the stored labels, applied to photos indexed since
    uclip query "tag:kočka"  /  uclip query "na gauči" --tag kočka

Scoring. A label is a query: its text goes through the query path (Encoders.encode_text_query: the
multilingual tower and Head_A, fp32) and a photo's score is its stored search vector's cosine to it, the
score `uclip query LABEL` prints for that photo. The label's vector and the neutral prompts' (below) are kept
with the label, so photos indexed later are scored without loading a text tower.

Threshold, per label, with no labels from the user: from the label's own scores over the library. Cosines
do not compare across labels (each label has its own offset and spread: one word sits at 0.10 on every
photo, another at 0.25), so no fixed cosine suits all, nor every model. But most labels fit a minority of a
library, so the bulk of a label's scores is the "not this" population: its centre and spread are estimated
robustly (median, and 1.4826 x the median absolute deviation, the standard deviation of a normal bulk; the
minority that fits barely moves either), and a photo holds the label when its score stands out of that bulk
by SPREADS robust standard deviations: threshold = median + SPREADS x spread. SPREADS = 3 is the usual
outlier rule (a normal bulk passes 0.13 % of its photos), not fitted to the test photos: there 2.5 did a
little better (F1 0.70 against 0.67, one photo), too small a difference on 10 positives to move off it. A second, per-photo condition: the photo scores higher for the label than for the neutral prompts
("a photo", "an image", ...) on average, i.e. it is closer to the label than to "any photo"; with fewer than
MIN_PHOTOS photos (a spread of so few is noise) that condition alone decides. Labels are thresholded
independently (no competition between the user's labels): a photo may hold several or none, and adding a
label never changes which photos hold the others, which is what makes a re-run incremental.

Limits: a label that fits most of the library (its bulk is the label) gives only its stand-outs; a label
the model cannot see (the stand-in test model knows ImageNet's classes only) tags at random outliers.

Alternatives measured on real photos and real weights (bench/README.md, "issue 23: tags": 28 photos, 9
labels in 6 languages): a fixed cosine (0.15: F1 0.57; 0.2: 0.67; 0.25: 0.57; depends on the model),
the argmax over the user's labels (one label per photo, every photo gets one: F1 0.47), the neutral margin
alone (precision 0.08), and per-photo normalisations against the neutral prompts or a background vocabulary
before the robust threshold (F1 0.46-0.67 at SPREADS 3, noisier): the robust threshold on the plain cosine
gave F1 0.67 (precision 0.75, recall 0.60) at SPREADS 3.

Incremental. A label's threshold is fixed when it is scored (the first `uclip tag` that names it); photos
indexed later are scored against the stored vectors and thresholds (`uclip tag` with no labels), new labels
only are scored when more are named, and a label of other vectors (the index re-projected after `uclip
train`, or another bundle) is scored again from its text. Tags live in the catalogue (index/photo_tags.py),
keyed by content hash and the vectors' identity. Nothing here deletes a photo or a record.
"""
from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass, field, replace
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
SPREADS = 3.0          # how many robust standard deviations above the library's median a photo must score
MIN_MARGIN = 0.0       # and above its mean score for the neutral prompts by this much
MIN_PHOTOS = 8         # fewer photos: no threshold from the library (NO_THRESHOLD), the neutral margin decides
NO_THRESHOLD = -1.0    # the lowest cosine
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
    """A label's threshold from its scores (cosines) over the library (module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < MIN_PHOTOS:
        return NO_THRESHOLD
    centre = float(np.median(scores))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(scores - centre)))
    return centre + SPREADS * spread


def label_vectors(encoders: Encoders, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The labels' query vectors [n, d] and the neutral prompts' mean vector [d]."""
    encoded = encoders.encode_text_query([*labels, *NEUTRAL_PROMPTS])
    return encoded[:len(labels)].astype(np.float32), encoded[len(labels):].mean(axis=0).astype(np.float32)


def scores_of(vectors: np.ndarray, rows: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Dot products [len(rows), n] of these rows' vectors with `directions` [n, d], a chunk of rows at a time."""
    out = np.empty((len(rows), len(directions)), np.float32)
    for start in range(0, len(rows), CHUNK_ROWS):
        part = np.asarray(vectors[rows[start:start + CHUNK_ROWS]], dtype=np.float32)
        out[start:start + len(part)] = part @ directions.T
    return out


def _score(vectors: np.ndarray, rows: np.ndarray, labels: Sequence[Label]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's score for each label [rows, labels], and whether it beats the neutral prompts by MIN_MARGIN."""
    scores = scores_of(vectors, rows, np.stack([x.vector for x in labels]))
    neutral = scores_of(vectors, rows, labels[0].neutral[None])      # one neutral vector per model
    return scores, scores - neutral > MIN_MARGIN


def run_tag(index_path: Path, bundle_path: Path, sessions: SessionFactory, labels: Sequence[str] = (), *,
            remove: Sequence[str] = (), clear: bool = False) -> TagSummary:
    """Score `labels` (new ones; those already stored are kept) and apply every stored label to the photos not
    scored yet; or drop labels (`remove`) or all of them (`clear`). Holds the index's writer lock."""
    started = time.perf_counter()
    if (remove or clear) and labels:
        raise TagError("give labels to add, or --remove / --clear, not both in one run")
    bundle = B.load_bundle(bundle_path, verify="cached", only=())
    encoders = Encoders(bundle, sessions, text_precision="fp32")

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        bundle.check_now(TEXT_FILES if bundle.has_heads else ENGLISH_FILES)
        return label_vectors(encoders, texts)

    with open_index(index_path, IndexIdentity.of(bundle), "write", sessions=sessions) as store:
        tags = PhotoTags(store.catalogue, bundle_model(bundle))
        if clear or remove:
            return _drop(tags, remove, clear, started)
        source = ProjectedIndex(store, bundle, encoders) if store.needs_reprojection else store
        summary = tag_photos(store, tags, labels, source.vectors, encode)
        summary.notes = list(source.notes)
    summary.seconds = time.perf_counter() - started
    return summary


def tag_photos(store, tags: PhotoTags, labels: Sequence[str], vectors: Callable[[], np.ndarray],
               encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> TagSummary:
    """The work of `uclip tag` on a writer's store: `vectors()` gives the search vectors of `tags.model`, `encode`
    the vectors of label texts and the neutral prompts' mean (label_vectors), called only for labels to score."""
    stored = {label.key: label for label in tags.labels()}
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
    given: list[Given] = []
    if fresh:
        encoded, neutral = encode(list(fresh.values()))
        new = [Label(key, text, tags.model, 0.0, vector, neutral) for (key, text), vector in zip(fresh.items(), encoded)]
        scores, above = _score(vectors(), rows, new)
        new = [replace(x, threshold=calibrate(column)) for x, column in zip(new, scores.T)]
        given += [Given(x, _passing(rows, hashes, scores[:, i], above[:, i], x.threshold), replace=True)
                  for i, x in enumerate(new)]
    done = tags.scored()
    todo = np.array([r for r in rows.tolist() if hashes[r] not in done], dtype=np.int64)
    if kept and len(todo):
        scores, above = _score(vectors(), todo, kept)
        given += [Given(x, _passing(todo, hashes, scores[:, i], above[:, i], x.threshold), replace=False)
                  for i, x in enumerate(kept)]
    tags.commit(given, [hashes[r] for r in rows.tolist()])
    counts = {x.key: x.photos for x in tags.labels()}
    actions = {k: ("rescored" if k in stored else "new") for k in fresh}
    summary = TagSummary(len(rows), len(rows) if fresh else len(todo))
    summary.labels = [LabelResult(x.label, counts.get(x.key, 0), round(x.threshold, 6), actions.get(x.key, "kept"))
                      for x in [*(g.label for g in given if g.replace), *kept]]
    summary.labels.sort(key=lambda x: (-x.photos, label_key(x.label)))
    return summary


def _passing(rows: np.ndarray, hashes: dict[int, str], scores: np.ndarray, above: np.ndarray,
             threshold: float) -> list[tuple[str, float]]:
    return [(hashes[int(r)], float(s)) for r, s, a in zip(rows, scores, above) if a and s > threshold]


def _drop(tags: PhotoTags, remove: Sequence[str], clear: bool, started: float) -> TagSummary:
    """`--remove LABEL` / `--clear`: the labels and their tags go, every photo stays."""
    stored = {label.key: label for label in tags.labels()}
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

"""Tags in the catalogue: the labels `uclip tag` scored (tags.py decides which photo gets which), the photos
each label was given, and the row masks a `tag:` filter makes of them.

    tag_labels(key PRIMARY KEY, label, model, threshold, vector, neutral, added_at)
        key: the label as `label_key` folds it (tag:Kočka finds "kočka"); label: as the user wrote it;
        model: the identity of the search vectors it was scored against (`vectors_model`); threshold: its
        calibrated threshold on the score (tags.py); vector: its query vector, neutral: the neutral prompts'
        mean vector (float32 bytes each), so photos indexed later are scored without loading a text tower
    photo_tags(key, content_hash, score)       a photo given that label, with its score
    tag_scored(content_hash PRIMARY KEY, model)  a photo scored against every label of that model

Keyed by content hash, not by row: a moved or renamed photo keeps its tags, a compaction's renumbering does
not touch them, and a changed file (new content) is a new, untagged photo. A removed photo's tags linger
harmlessly (every read joins the live records) until its content comes back or `uclip tag --clear`.

Tied to the vectors: a label of another model than the vectors searched now (the index re-projected after
`uclip train`, or searched through another bundle's heads) is *stale*: it passes no photo, and a filter on it
says to run `uclip tag` again, which scores it anew. `model` is sha256 of the image and heads fingerprints
(those of the index's own vectors, or of the bundle a query projects them with: `PhotoTags(catalogue, model)`).

The tables are created by the first `uclip tag` (CREATE TABLE IF NOT EXISTS, in the commit that fills them):
an index without them has no tags, and readers never write. Nothing here deletes a photo or a record.
"""
from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .catalogue import Catalogue

TABLES = ("tag_labels", "photo_tags", "tag_scored")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tag_labels(key TEXT PRIMARY KEY, label TEXT NOT NULL, model TEXT NOT NULL,
    threshold REAL NOT NULL, vector BLOB NOT NULL, neutral BLOB NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS photo_tags(key TEXT NOT NULL, content_hash TEXT NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (key, content_hash));
CREATE INDEX IF NOT EXISTS photo_tags_hash ON photo_tags(content_hash);
CREATE TABLE IF NOT EXISTS tag_scored(content_hash TEXT PRIMARY KEY, model TEXT NOT NULL);
"""


def label_key(label: str) -> str:
    """How labels are matched: Unicode NFC, trimmed, case-folded ("Kočka" and "kočka" are one label)."""
    return unicodedata.normalize("NFC", label).strip().casefold()


def vectors_model(image_fingerprint: str, heads_fingerprint: str) -> str:
    """The identity of a set of search vectors: the image encoder (+ preprocessing) and the heads."""
    text = json.dumps({"image": image_fingerprint, "heads": heads_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Label:
    key: str
    label: str
    model: str
    threshold: float
    vector: np.ndarray         # the label's query vector (a photo's score: its cosine to it)
    neutral: np.ndarray        # the neutral prompts' mean vector (tags.py: a photo must score above it)
    photos: int = 0            # live photos holding it


@dataclass(frozen=True)
class Given:
    """One label's scoring, to commit: its record and the photos (content hashes) given it, with scores."""

    label: Label
    photos: Sequence[tuple[str, float]]
    replace: bool              # a label scored anew: its earlier photos are dropped first


class PhotoTags:
    """The tags one catalogue holds, as the vectors of `model` see them (None: the index's own vectors)."""

    def __init__(self, catalogue: Catalogue, model: str | None = None):
        self.catalogue = catalogue
        self._model = model

    @property
    def model(self) -> str:
        meta = self.catalogue.meta
        return self._model or vectors_model(meta["image_fingerprint"], meta["heads_fingerprint"])

    @property
    def present(self) -> bool:
        """The tag tables exist (some `uclip tag` ran on this index)."""
        return set(TABLES) <= {name for (name,) in self.catalogue.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}

    def labels(self) -> list[Label]:
        """Every stored label, with the live photos holding it (stale labels: 0), most photos first."""
        if not self.present:
            return []
        counts = dict(self.catalogue.connection.execute(
            "SELECT key, COUNT(DISTINCT row) FROM photo_tags JOIN files USING (content_hash) "
            "WHERE row IS NOT NULL AND row < ? GROUP BY key", (self.catalogue.rows,)).fetchall())
        found = [Label(key, label, model, float(threshold), np.frombuffer(vector, dtype=np.float32),
                       np.frombuffer(neutral, dtype=np.float32), counts.get(key, 0) if model == self.model else 0)
                 for key, label, model, threshold, vector, neutral in self.catalogue.connection.execute(
                     "SELECT key, label, model, threshold, vector, neutral FROM tag_labels")]
        return sorted(found, key=lambda x: (-x.photos, x.key))

    def mask(self, keys: Iterable[str]) -> np.ndarray:
        """Rows whose photo holds every label of `keys` under this model (a bool mask over the committed rows);
        an unknown or stale label passes nothing."""
        mask = np.zeros(self.catalogue.rows, dtype=bool)
        keys = list(dict.fromkeys(keys))
        if not keys or not self.present:
            return mask
        current = {label.key for label in self.labels() if label.model == self.model}
        if not set(keys) <= current:
            return mask
        marks = ",".join("?" * len(keys))
        mask[self.catalogue.fetch_rows(
            f"SELECT row FROM files WHERE row IS NOT NULL AND row < ? AND content_hash IN (SELECT content_hash "
            f"FROM photo_tags WHERE key IN ({marks}) GROUP BY content_hash HAVING COUNT(*) = ?)",
            (self.catalogue.rows, *keys, len(keys)))] = True
        return mask

    def problem(self, keys: Iterable[str]) -> str | None:
        """Why a filter on these labels can pass nothing (no tags yet, an unknown or a stale label), or None."""
        labels = {label.key: label for label in self.labels()}
        for key in dict.fromkeys(keys):
            if not labels:
                return (f"tag:{key}: the index {self.catalogue.folder} has no tags yet: run "
                        f"`uclip tag \"{key}, ...\"` first (any labels, any language)")
            if key not in labels:
                known = ", ".join(sorted(labels)[:10]) + (" ..." if len(labels) > 10 else "")
                return (f"tag:{key}: no such tag in the index {self.catalogue.folder} (its tags: {known}); "
                        f"add it with `uclip tag \"{key}\"`")
            if labels[key].model != self.model:
                return (f"tag:{key}: the tags were scored with other heads than the ones searching now (the index "
                        "was re-projected, or another bundle is used): run `uclip tag` to score them again")
        return None

    def untagged(self) -> int:
        """Live photos not yet scored against this model's labels (indexed since the last `uclip tag`)."""
        if not self.present:
            return 0
        return self.catalogue.connection.execute(
            "SELECT COUNT(DISTINCT row) FROM files WHERE row IS NOT NULL AND row < ? AND content_hash NOT IN "
            "(SELECT content_hash FROM tag_scored WHERE model = ?)", (self.catalogue.rows, self.model)).fetchone()[0]

    def scored(self) -> set[str]:
        """Content hashes already scored against every label of this model."""
        if not self.present:
            return set()
        return {h for (h,) in self.catalogue.connection.execute(
            "SELECT content_hash FROM tag_scored WHERE model = ?", (self.model,))}

    # ------------------------------------------------------------------ writing (a writer's catalogue)

    def commit(self, given: Sequence[Given], scored: Iterable[str]) -> None:
        """In one commit: each label's record and photos (a label scored anew loses its earlier photos first),
        and `scored` (content hashes) marked as scored against every label of this model."""
        now = time.time()
        with self.catalogue.transaction() as c:
            _create(c)
            for g in given:
                label = g.label
                if g.replace:
                    c.execute("DELETE FROM photo_tags WHERE key = ?", (label.key,))
                c.execute("INSERT OR REPLACE INTO tag_labels(key, label, model, threshold, vector, neutral, added_at) "
                          "VALUES (?, ?, ?, ?, ?, ?, coalesce((SELECT added_at FROM tag_labels WHERE key = ?), ?))",
                          (label.key, label.label, label.model, float(label.threshold),
                           np.asarray(label.vector, dtype=np.float32).tobytes(),
                           np.asarray(label.neutral, dtype=np.float32).tobytes(), label.key, now))
                c.executemany("INSERT OR REPLACE INTO photo_tags(key, content_hash, score) VALUES (?, ?, ?)",
                              [(label.key, h, float(s)) for h, s in g.photos])
            c.executemany("INSERT OR REPLACE INTO tag_scored(content_hash, model) VALUES (?, ?)",
                          [(h, self.model) for h in scored])

    def remove(self, keys: Sequence[str]) -> None:
        """Drop labels and their photos' tags (never a photo) in one commit."""
        with self.catalogue.transaction() as c:
            _create(c)
            for key in keys:
                c.execute("DELETE FROM photo_tags WHERE key = ?", (key,))
                c.execute("DELETE FROM tag_labels WHERE key = ?", (key,))

    def clear(self) -> None:
        """Drop every label and tag (never a photo) in one commit."""
        with self.catalogue.transaction() as c:
            _create(c)
            for table in TABLES:
                c.execute(f"DELETE FROM {table}")


def _create(c) -> None:
    for statement in _SCHEMA.strip().split(";"):
        if statement.strip():
            c.execute(statement)

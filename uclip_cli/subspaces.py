"""The subspaces the heads remove from their inputs: language identity (Head_A) and modality (Head_B).

Numpy only: `uclip train` builds its torch heads from them (train/head_setup.py), and a default bundle
assembled without torch writes them into its ONNX heads (assemble.py).

## Language identity in the multilingual space (Head_A)

A multilingual sentence encoder puts each language at its own offset: sentences of one language
share a component that says "this is Czech" more than what the sentence means (on XM3600 captions
through multilingual-e5-small, two Czech captions of unrelated images are closer than a Czech and an
English caption of the same image more often than not). Heads trained on English anchors learn
English; foreign text then arrives off the distribution they were trained on (issue 13).

The language means estimate those offsets: the mean of the (L2-normalised) English anchors and the
mean of each language's rows of the foreign memory (the memory arrives grouped by file/language).
Their span holds the common offset of the whole space and each language's own offset. Projecting it
out (x -> normalise(x - x Q Qᵀ)) removes every one of those offsets from every input alike, so a
query needs no language code: Head_A applies the same projection at training and at query time
(train/heads.py keeps Q as a buffer of Head_A and exports it inside head_a.onnx). The price is r
dimensions (one per language and English) of a 384- or 768-d space. Centering each language on its
own mean (Libovický et al., "On the Language Neutrality of Pre-trained Multilingual
Representations", 2020) removes the same offsets but needs the language at query time; projecting
out the span of the means is the code-free form of it.

## The modality gap in the CLIP space (Head_B)

CLIP puts images and text in two cones: every image embedding shares a component, every text
embedding another, and an image is closer to unrelated images than to its own caption (Liang et
al., "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive Representation
Learning", NeurIPS 2022: the gap is mostly a constant offset between the modalities). uCLIP fits
Head_B on English captions through CLIP's *text* tower (the anchors), then applies it to *images*
at index time: whatever Head_B learned is applied off the distribution it was fitted on, shifted by
the gap. The same problem, and the same cure, as language identity on the multilingual side
(above): estimate the offsets by their means — the CLIP text anchors' mean and the image
memory's mean (unpaired photos: no pairing needed) — and project the span of the two out of every
input of Head_B (x -> normalise(x - x Q Qᵀ)). A photo and a caption then differ by what they show
and say, not by which tower made them; the projection is a buffer of Head_B, exported inside
head_b.onnx, so indexing and the trainer apply the same one and nothing at query time needs to know
the modality. The price is two dimensions of 512 (one when the means are parallel).

## Which rows are one language: detected, not read off the file layout

The language means need each foreign row's language. A recipe or `--foreign LANG=FILE` names it, and
each `--foreign-features` file is taken as one group; but one file may hold several languages (a
user's mixed notes, a scraped corpus), and one mean over five languages is one direction where five
were needed (issue 20: a mixed file cost 1.1 R@1 in domain, 0.6 out of domain). `detect_languages`
finds the languages from the embeddings alone: language identity is the strongest component of these
spaces (above), so the rows of a language form a cluster far from the others along the line between
their means, while a split of one language by topic is not. It bisects recursively (2-means, best of a
few starts, in the top DETECT_DIMS principal directions of the rows being split, which keeps a few
hundred rows from fitting noise in 384 dimensions), keeps a split only when the two halves are
separated along the line between their centres (Fisher's ratio (m1 - m2)² / (v1 + v2) of the
projections above SEPARATION), then moves each row to its nearest group mean in the full space.
Measured on XM3600 captions through multilingual-e5-small: splits between two languages score 18-60
(cs/hr, es/pt and ru/uk the lowest), splits of one language by content 5-13 — except XM3600's
Romanian, whose captions open with a few fixed phrases and which splits into two or three groups;
da/no/sv stay one group. `uclip train` (train/head_setup.py) runs it only on a memory that comes as one
group: where several files are given it trusts them, because an over-split language costs a little
(0.44 R@1 in domain) and files are most often one language each. A language-ID model would need the
text, and `uclip train` often has only the features.

Measured (README "Does it learn on real text encoders?"): in the synthetic world, whose CLIP-like
space has a modality gap, it is the largest single gain of issue 13's options; on the real-text
yardstick, whose "images" are English captions (no gap), it is neutral — as it should be.
"""
from __future__ import annotations

import numpy as np


MEAN_BLOCK_ROWS = 65536       # rows per block when averaging a (memory-mapped) array
# language detection (detect_languages)
SEPARATION = 12.0             # Fisher ratio above which a bisection is two languages (module docstring)
DETECT_DIMS = 16              # principal directions a group is bisected in
DETECT_MIN_ROWS = 20          # a detected language has at least this many rows
DETECT_SAMPLE = 4000          # rows a bisection is fitted on (then every row is assigned)
DETECT_MAX = 64               # at most this many languages per group
DETECT_STARTS = 3
GROUP_SHARE = 0.1             # a given group (file) splits only into detected languages holding this share of it
RANK_TOLERANCE = 1e-6         # singular values below this share of the largest are dropped


def normalised_mean(array: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean of the L2-normalised rows of array (or of array[rows]), in float64, block by block."""
    total = np.zeros(array.shape[1], dtype=np.float64)
    index = np.arange(array.shape[0]) if rows is None else np.asarray(rows)
    for start in range(0, len(index), MEAN_BLOCK_ROWS):
        picked = index[start:start + MEAN_BLOCK_ROWS]
        contiguous = len(picked) and picked[-1] - picked[0] == len(picked) - 1
        block = np.asarray(array[picked[0]:picked[-1] + 1] if contiguous else array[picked], dtype=np.float64)
        total += (block / np.linalg.norm(block, axis=1, keepdims=True)).sum(axis=0)
    return total / max(len(index), 1)


def language_means(english_multi: np.ndarray, foreign_memory: np.ndarray,
                   foreign_language: np.ndarray | None, english_rows: np.ndarray | None = None) -> np.ndarray:
    """[1 + languages, d]: the English anchors' mean (of english_rows, default all), then each foreign
    language's mean (one row per language present; the whole memory as one group when none is known)."""
    means = [normalised_mean(english_multi, english_rows)]
    if foreign_language is None:
        means.append(normalised_mean(foreign_memory))
    else:
        labels = np.asarray(foreign_language)
        for code in np.unique(labels):
            means.append(normalised_mean(foreign_memory, np.flatnonzero(labels == code)))
    return np.stack(means)


def span_of(means: np.ndarray) -> np.ndarray:
    """Orthonormal basis [d, r] of the span of the mean vectors (float32), r = their rank."""
    u, s, _ = np.linalg.svd(np.asarray(means, dtype=np.float64).T, full_matrices=False)
    keep = s > RANK_TOLERANCE * s.max()
    return u[:, keep].astype(np.float32)


def language_directions(english_multi: np.ndarray, foreign_memory: np.ndarray,
                        foreign_language: np.ndarray | None, english_rows: np.ndarray | None = None) -> np.ndarray:
    """The subspace Head_A removes: the span of the English mean and every foreign language's mean."""
    return span_of(language_means(english_multi, foreign_memory, foreign_language, english_rows))

def modality_means(english_clip: np.ndarray, image_memory: np.ndarray,
                   english_rows: np.ndarray | None = None) -> np.ndarray:
    """[2, d]: the mean of the CLIP text anchors (english_rows of them, default all) and of the image memory."""
    return np.stack([normalised_mean(english_clip, english_rows), normalised_mean(image_memory)])


def modality_directions(english_clip: np.ndarray, image_memory: np.ndarray,
                        english_rows: np.ndarray | None = None) -> np.ndarray:
    """The subspace Head_B removes: the span of the CLIP text anchors' mean and the image memory's mean."""
    return span_of(modality_means(english_clip, image_memory, english_rows))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _bisect(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(side of each row, Fisher ratio of the split) for the best 2-means split of x (normalised rows) in its
    top principal directions, fitted on at most DETECT_SAMPLE rows."""
    fit = x if len(x) <= DETECT_SAMPLE else x[rng.choice(len(x), DETECT_SAMPLE, replace=False)]
    centre = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - centre, full_matrices=False)
    basis = vt[:DETECT_DIMS].T
    y = (fit - centre) @ basis
    best = None
    for _ in range(DETECT_STARTS):
        c = y[rng.choice(len(y), 2, replace=False)]
        for _ in range(50):
            side = np.argmin(((y[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            if side.min() == side.max():
                break
            new = np.stack([y[side == 0].mean(0), y[side == 1].mean(0)])
            if np.allclose(new, c):
                break
            c = new
        if side.min() == side.max():
            continue
        direction = (c[0] - c[1]) / max(np.linalg.norm(c[0] - c[1]), 1e-12)
        p = y @ direction
        ratio = (p[side == 0].mean() - p[side == 1].mean()) ** 2 / max(p[side == 0].var() + p[side == 1].var(), 1e-12)
        if best is None or ratio > best[0]:
            best = (ratio, c)
    if best is None:
        return np.zeros(len(x), dtype=np.int64), 0.0
    ratio, c = best
    z = (x - centre) @ basis
    return np.argmin(((z[:, None, :] - c[None]) ** 2).sum(-1), axis=1), float(ratio)


def detect_languages(memory: np.ndarray, groups: np.ndarray | None = None, *, seed: int = 0) -> np.ndarray:
    """A language label per row of memory (0..n-1), found from the embeddings (see the module docstring).

    The languages are found over the whole memory at once (a split must stand out against the other languages
    present, not only inside one file), then crossed with the given groups (e.g. one per file; None: one
    group): a group keeps one label unless it holds several detected languages, each with at least
    DETECT_MIN_ROWS rows and GROUP_SHARE of the group's rows (a few misassigned rows do not split a file)."""
    detected = _detect(_unit(memory), np.random.default_rng(seed))
    if groups is None:
        return detected
    groups = np.asarray(groups)
    labels = np.empty(len(memory), dtype=np.int64)
    found = 0
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        counts = np.bincount(detected[rows])
        kept = np.flatnonzero((counts >= DETECT_MIN_ROWS) & (counts >= GROUP_SHARE * len(rows)))
        if len(kept) <= 1:
            labels[rows] = found
            found += 1
            continue
        # rows of a detected language too small to keep go to the kept language whose mean is nearest
        x = _unit(memory[rows])
        means = np.stack([x[detected[rows] == k].mean(axis=0) for k in kept])
        position = {int(k): i for i, k in enumerate(kept)}
        nearest = np.argmax(x @ means.T, axis=1)
        labels[rows] = found + np.array([position.get(int(d), int(n)) for d, n in zip(detected[rows], nearest)])
        found += len(kept)
    return labels


def _detect(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Recursive bisection of the normalised rows x, each kept split SEPARATION apart, then polished."""
    pending, done = [np.arange(len(x))], []
    while pending:
        rows = pending.pop()
        if len(rows) < 2 * DETECT_MIN_ROWS or len(done) + len(pending) + 1 >= DETECT_MAX:
            done.append(rows)
            continue
        side, ratio = _bisect(x[rows], rng)
        halves = [rows[side == 0], rows[side == 1]]
        if ratio > SEPARATION and min(map(len, halves)) >= DETECT_MIN_ROWS:
            pending += halves
        else:
            done.append(rows)
    return _polish(x, done)


def _polish(x: np.ndarray, parts: list[np.ndarray], rounds: int = 10) -> np.ndarray:
    """Labels 0..k-1 for the rows of x: the bisection's parts, then each row moved to its nearest part mean in the
    full space (a few rounds of k-means from there: a bisection assigns rows in its parent's principal directions)."""
    labels = np.empty(len(x), dtype=np.int64)
    for i, rows in enumerate(sorted(parts, key=lambda r: r[0])):
        labels[rows] = i
    for _ in range(rounds):
        means = np.stack([x[labels == i].mean(axis=0) for i in range(labels.max() + 1)])
        moved = np.argmax(x @ means.T, axis=1)
        if np.array_equal(moved, labels) or np.bincount(moved, minlength=len(means)).min() < DETECT_MIN_ROWS:
            break
        labels = moved
    return labels

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

Measured (README "Does it learn on real text encoders?"): in the synthetic world, whose CLIP-like
space has a modality gap, it is the largest single gain of issue 13's options; on the real-text
yardstick, whose "images" are English captions (no gap), it is neutral — as it should be.
"""
from __future__ import annotations

import numpy as np


MEAN_BLOCK_ROWS = 65536       # rows per block when averaging a (memory-mapped) array
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

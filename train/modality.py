"""The modality gap in the CLIP space, and the subspace Head_B removes so that it does not matter.

CLIP puts images and text in two cones: every image embedding shares a component, every text
embedding another, and an image is closer to unrelated images than to its own caption (Liang et
al., "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive Representation
Learning", NeurIPS 2022: the gap is mostly a constant offset between the modalities). uCLIP fits
Head_B on English captions through CLIP's *text* tower (the anchors), then applies it to *images*
at index time: whatever Head_B learned is applied off the distribution it was fitted on, shifted by
the gap. The same problem, and the same cure, as language identity on the multilingual side
(train/language.py): estimate the offsets by their means — the CLIP text anchors' mean and the image
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

from .language import normalised_mean, span_of


def modality_means(english_clip: np.ndarray, image_memory: np.ndarray,
                   english_rows: np.ndarray | None = None) -> np.ndarray:
    """[2, d]: the mean of the CLIP text anchors (english_rows of them, default all) and of the image memory."""
    return np.stack([normalised_mean(english_clip, english_rows), normalised_mean(image_memory)])


def modality_directions(english_clip: np.ndarray, image_memory: np.ndarray,
                        english_rows: np.ndarray | None = None) -> np.ndarray:
    """The subspace Head_B removes: the span of the CLIP text anchors' mean and the image memory's mean."""
    return span_of(modality_means(english_clip, image_memory, english_rows))

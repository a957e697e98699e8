"""How a training run builds its heads and its pseudo foreign texts, from the issue-13 options.

The paper's run is: random heads, one soft retrieval over the whole foreign memory (PAPER_START in
train/config.py; uclip's defaults differ, see its docstring). The options (TrainConfig fields) change
only these things; the trainer builds its heads with build_heads (and keeps them as they are when it
does not refine: TrainConfig.refined) and, with retrieval_per_language, takes the pseudo foreign texts
from per_language_targets:

    language_projection       Head_A removes the span of the language means (uclip_cli/subspaces.py)
    modality_projection       Head_B removes the span of the CLIP text and image means (uclip_cli/subspaces.py)
    init = ridge | procrustes  both heads start as a closed-form alignment of the anchors (train/closed_form.py)
    init = ridge-to-multilingual   the same, fitted from the CLIP space into the multilingual space
    freeze_head_a             Head_A keeps its closed-form start, only Head_B trains (LiT's locked tower)
    head_b = kernel           Head_B is a kernel regressor (train/heads.py KernelHead), its landmarks anchors
    adapt_head_b              Head_B's closed-form start adapted to the image memory, unpaired (train/adapt.py)
    retrieval_per_language    each anchor retrieves from one language's memory, languages balanced
                              (train/retrieval.py, precompute_targets_per_language)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from uclip_cli.subspaces import detect_languages, language_directions, modality_directions

from uclip_cli.closed_form import shared_embedding

from .adapt import adapt_head_b
from .closed_form import anchor_features, closed_form_start, set_landmarks
from .config import TrainConfig, TrainConfigError
from .data import TrainInputs
from .heads import KernelHead, UCLIPHeads
from .retrieval import precompute_targets_per_language


def build_heads(inputs: TrainInputs, config: TrainConfig, anchor_rows: np.ndarray | None = None,
                log: Callable[[str], None] = lambda m: None) -> tuple[UCLIPHeads, dict[str, Any]]:
    """The heads a run starts from (torch's generator seeded by the caller), and what was fitted for them.

    anchor_rows: the training captions (the held-out ones are not fitted, so they stay held out).
    log: where the languages found in the foreign memory are said.
    """
    rows = np.arange(inputs.english_clip.shape[0]) if anchor_rows is None else np.asarray(anchor_rows)
    info: dict[str, Any] = {}
    directions = None
    if config.language_projection:
        groups = language_groups_of(inputs, config, log)
        directions = language_directions(inputs.english_multi, inputs.foreign_memory, groups, english_rows=rows)
        info["language_directions"] = int(directions.shape[1])
        info["languages"] = list(inputs.foreign_languages) if inputs.foreign_language is not None else "one group"
        if groups is not None:
            info["language_groups"] = int(np.unique(groups).size)
    modality = None
    if config.modality_projection:
        modality = modality_directions(inputs.english_clip, inputs.image_memory, english_rows=rows)
        info["modality_directions"] = int(modality.shape[1])
    heads = UCLIPHeads(inputs.d_multi, inputs.d_clip, config.d_shared, config.hidden_mult,
                       language_directions=0 if directions is None else directions.shape[1],
                       modality_directions=0 if modality is None else modality.shape[1], head_b=config.head_b,
                       landmarks=min(config.hidden_mult * inputs.d_clip, len(rows)))
    if directions is not None:
        heads.head_a.set_removed(torch.from_numpy(directions))
    if modality is not None:
        heads.head_b.set_removed(torch.from_numpy(modality))
    if isinstance(heads.head_b, KernelHead):
        set_landmarks(heads.head_b, inputs.english_clip, rows)
        info["head_b"] = f"kernel, {heads.head_b.landmarks} landmarks"
    if config.init != "random":
        info.update(closed_form_start(heads, inputs.english_clip, inputs.english_multi, config.init, rows=rows))
    if config.adapt_head_b:
        fit = None
        if config.adapt_head_b in ("coral-input", "self-learning"):
            _, _, _, e_I, e_K = anchor_features(heads, inputs.english_clip, inputs.english_multi, rows)
            fit = {"anchors": (e_I / np.linalg.norm(e_I, axis=1, keepdims=True), e_K),
                   "embed": shared_embedding(e_K, heads.d_shared)}
        info.update(adapt_head_b(heads, config.adapt_head_b, inputs.image_memory, inputs.foreign_memory, **(fit or {})))
    if config.head_a_frozen:
        heads.head_a.freeze()
        info["head_a"] = "frozen"
    return heads, info


def language_groups_of(inputs: TrainInputs, config: TrainConfig, log: Callable[[str], None]) -> np.ndarray | None:
    """The foreign memory's language groups for the language means. Several files (or a recipe's languages): one
    group each, as given. One file, or none known: the languages detected in it (config.detect_languages;
    subspaces.detect_languages). Detection is not run across several files: it may split a language whose
    text is formulaic into two groups, which cost 0.44 R@1 in domain (docs/results.md, issue 20)."""
    given = inputs.foreign_language
    if not config.detect_languages or not len(inputs.foreign_memory) or (
            given is not None and len(np.unique(given)) > 1):
        return given
    groups = detect_languages(inputs.foreign_memory)
    name = inputs.foreign_languages[0] if given is not None and inputs.foreign_languages else "the foreign memory"
    sizes = ", ".join(f"{n:,}" for n in np.bincount(groups))
    log(f"languages detected in {name}: {int(groups.max()) + 1} ({sizes} rows; one mean each for Head_A's "
        "language subspace)")
    return groups


def per_language_targets(english_multi: np.ndarray, foreign_memory: np.ndarray, foreign_language: np.ndarray | None,
                         config: TrainConfig, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo foreign text of every anchor from one language's memory each (retrieval_per_language) and
    the softmax mass it keeps; kwargs as precompute_targets (return_mass is implied). The anchors'
    languages come from one fixed shuffle, the same for every seed, like the mixed retrieval's targets."""
    if foreign_language is None:
        raise TrainConfigError("retrieval_per_language needs the language of each foreign-memory row "
                               "(give each language its own --foreign file)")
    kwargs.pop("return_mass", None)
    targets, mass, _ = precompute_targets_per_language(english_multi, foreign_memory, foreign_language,
                                                       config.tau_retrieval, **kwargs)
    return targets, mass

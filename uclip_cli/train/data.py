"""Training inputs: caption files and the checks every feature array passes before training starts.

uCLIP's only pairing is a caption with itself: English caption i has e_I[i] (CLIP text encoder)
and e_K[i] (multilingual encoder). The image memory and the foreign-text memory are unordered
sets; nothing pairs them with a caption or with each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uclip_cli.errors import UclipError
from .config import TrainConfig

FINITE_CHECK_ROWS = 65536   # rows per block when scanning a (memory-mapped) array for NaN/inf


class TrainInputError(UclipError):
    """A training input that cannot be used; the one-line message names the file and what to do."""


def read_captions(path: Path) -> list[str]:
    """One caption per line, stripped; blank lines dropped. UTF-8 only."""
    path = Path(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")   # a leading BOM is not part of the first caption
    except FileNotFoundError:
        raise TrainInputError(f"{path}: caption file not found") from None
    except IsADirectoryError:
        raise TrainInputError(f"{path}: is a folder, expected a text file with one caption per line") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TrainInputError(f"{path}: not UTF-8 (line {line}, byte {e.start}): convert it with iconv -t UTF-8") from None
    captions = [line.strip() for line in text.split("\n")]   # not splitlines(): U+2028 etc. stay inside a caption
    captions = [c for c in captions if c]
    if not captions:
        raise TrainInputError(f"{path}: no captions (empty or only blank lines)")
    return captions


def check_feature_array(array: np.ndarray, *, name: str, dim: int | None = None, min_rows: int = 1) -> None:
    """Refuse what training cannot use: not 2-D, empty, wrong width, too few rows, NaN/inf or all-zero rows."""
    if array.ndim != 2:
        raise TrainInputError(f"{name}: expected a 2-D [rows, dim] feature array, got shape {tuple(array.shape)}")
    rows, width = array.shape
    if rows == 0 or width == 0:
        raise TrainInputError(f"{name}: empty feature array (shape {tuple(array.shape)})")
    if not np.issubdtype(array.dtype, np.floating):
        raise TrainInputError(f"{name}: features must be floating point, got {array.dtype}")
    if dim is not None and width != dim:
        raise TrainInputError(f"{name}: features are {width}-d but {dim}-d are expected: extract them with the same encoder")
    if rows < min_rows:
        raise TrainInputError(f"{name}: {rows} rows, fewer than the {min_rows} needed (one batch): add data or lower --batch-size")
    for start in range(0, rows, FINITE_CHECK_ROWS):
        block = np.asarray(array[start:start + FINITE_CHECK_ROWS], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise TrainInputError(f"{name}: row {start + int(np.argmax(bad))} holds NaN or infinite values")
        zero = ~(np.abs(block) > 0).any(axis=1)
        if zero.any():
            raise TrainInputError(f"{name}: row {start + int(np.argmax(zero))} is all zeros (cannot be L2-normalised)")


ARRAY_NAMES = ("english_clip", "english_multi", "image_memory", "foreign_memory")


@dataclass(frozen=True)
class TrainInputs:
    """The named inputs of one training run: four frozen-feature arrays, and what is known about their rows.

    english_clip [N, d_clip] and english_multi [N, d_multi] are the same N English captions through
    the CLIP text encoder (e_I) and the multilingual encoder (e_K), row for row; image_memory
    [M1, d_clip] and foreign_memory [M2, d_multi] are unordered, unpaired memories. Arrays may be
    memory-mapped. foreign_language, when known, gives each foreign-memory row's group as an index
    into foreign_languages (a language code from a recipe or `--foreign LANG=FILE`, else the name of
    the file or dataset it came from). names: what error messages call each array (its file(s)).
    """

    english_clip: np.ndarray
    english_multi: np.ndarray
    image_memory: np.ndarray
    foreign_memory: np.ndarray
    foreign_language: np.ndarray | None = None      # [M2] int16, index into foreign_languages
    foreign_languages: tuple[str, ...] = ()
    names: dict[str, str] = field(default_factory=dict)

    @property
    def d_clip(self) -> int:
        return self.english_clip.shape[1]

    @property
    def d_multi(self) -> int:
        return self.english_multi.shape[1]

    def name(self, array: str) -> str:
        """What to call one of the four arrays in a message."""
        return self.names.get(array, array)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.english_clip, self.english_multi, self.image_memory, self.foreign_memory


def language_groups(sizes: list[tuple[str, int]]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(foreign_language, foreign_languages) for a memory made of consecutive parts [(label, rows), ...].

    Parts with the same label share one group: two files of Czech sentences are one language.
    """
    labels = tuple(dict.fromkeys(label for label, _ in sizes))
    index = {label: i for i, label in enumerate(labels)}
    groups = np.concatenate([np.full(rows, index[label], dtype=np.int16) for label, rows in sizes]) \
        if sizes else np.zeros(0, np.int16)
    return groups, labels


def split_sizes(n_captions: int, config: TrainConfig) -> tuple[int, int]:
    """(training captions, held-out captions)."""
    held = min(int(round(n_captions * config.heldout_fraction)), config.heldout_max)
    held = held if held >= 2 else 0     # a contrastive loss over fewer than 2 captions means nothing
    return n_captions - held, held


def check_training_inputs(inputs: TrainInputs, config: TrainConfig, *,
                          dims: dict[str, int] | None = None) -> TrainInputs:
    """Check all inputs before any training starts; raises TrainInputError naming the first bad one.

    dims: expected widths {"clip": d_v, "multilingual": d_m}, e.g. from the bundle manifest.
    A memory may hold fewer rows than a batch (its soft-retrieval targets are then near-duplicates,
    harmless); the captions must fill at least one batch.
    """
    english_clip, english_multi, image_memory, foreign_memory = inputs.arrays()
    name = inputs.name
    dims = dims or {}
    d_clip = dims.get("clip", english_clip.shape[-1] if english_clip.ndim == 2 else None)
    d_multi = dims.get("multilingual", english_multi.shape[-1] if english_multi.ndim == 2 else None)
    check_feature_array(english_clip, name=name("english_clip"), dim=d_clip)
    check_feature_array(english_multi, name=name("english_multi"), dim=d_multi)
    if english_clip.shape[0] != english_multi.shape[0]:
        raise TrainInputError(
            f"{name('english_clip')} has {english_clip.shape[0]} captions but {name('english_multi')} has "
            f"{english_multi.shape[0]}: both must encode the same caption list in the same order"
        )
    n_train, n_held = split_sizes(english_clip.shape[0], config)
    if n_train < config.batch_size:
        raise TrainInputError(
            f"{name('english_clip')}: {n_train} training captions (after holding out {n_held}) "
            f"is fewer than one batch of {config.batch_size}: add captions or lower --batch-size"
        )
    check_feature_array(image_memory, name=name("image_memory"), dim=d_clip)
    check_feature_array(foreign_memory, name=name("foreign_memory"), dim=d_multi)
    if inputs.foreign_language is not None:
        groups = np.asarray(inputs.foreign_language)
        if groups.shape != (foreign_memory.shape[0],):
            raise TrainInputError(f"{name('foreign_memory')}: {groups.shape[0] if groups.ndim else 0} language labels "
                                  f"for {foreign_memory.shape[0]} rows")
        if groups.size and not (0 <= groups.min() and groups.max() < len(inputs.foreign_languages)):
            raise TrainInputError(f"{name('foreign_memory')}: a language label outside {list(inputs.foreign_languages)}")
    return inputs

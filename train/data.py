"""Training inputs: caption files and the checks every feature array passes before training starts.

uCLIP's only pairing is a caption with itself: English caption i has e_I[i] (CLIP text encoder)
and e_K[i] (multilingual encoder). The image memory and the foreign-text memory are unordered
sets; nothing pairs them with a caption or with each other.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainingArrays:
    """The four feature arrays of one training run, checked; names are what error messages call them."""

    english_clip: np.ndarray      # [N, d_clip]  e_I
    english_multi: np.ndarray     # [N, d_multi] e_K (same captions, same order)
    image_memory: np.ndarray      # [M1, d_clip]
    foreign_memory: np.ndarray    # [M2, d_multi]

    @property
    def d_clip(self) -> int:
        return self.english_clip.shape[1]

    @property
    def d_multi(self) -> int:
        return self.english_multi.shape[1]


def split_sizes(n_captions: int, config: TrainConfig) -> tuple[int, int]:
    """(training captions, held-out captions)."""
    held = int(round(n_captions * config.heldout_fraction))
    held = held if held >= 2 else 0     # a contrastive loss over fewer than 2 captions means nothing
    return n_captions - held, held


def check_training_arrays(english_clip: np.ndarray, english_multi: np.ndarray, image_memory: np.ndarray,
                          foreign_memory: np.ndarray, config: TrainConfig, *,
                          names: dict[str, str] | None = None, dims: dict[str, int] | None = None) -> TrainingArrays:
    """Check all inputs before any training starts; raises TrainInputError naming the first bad one.

    names: what to call each array in messages (e.g. its file), keys as the parameters.
    dims: expected widths {"clip": d_v, "multilingual": d_m}, e.g. from the bundle manifest.
    """
    names = {**{k: k for k in ("english_clip", "english_multi", "image_memory", "foreign_memory")}, **(names or {})}
    dims = dims or {}
    d_clip = dims.get("clip", english_clip.shape[-1] if english_clip.ndim == 2 else None)
    d_multi = dims.get("multilingual", english_multi.shape[-1] if english_multi.ndim == 2 else None)
    check_feature_array(english_clip, name=names["english_clip"], dim=d_clip)
    check_feature_array(english_multi, name=names["english_multi"], dim=d_multi)
    if english_clip.shape[0] != english_multi.shape[0]:
        raise TrainInputError(
            f"{names['english_clip']} has {english_clip.shape[0]} captions but {names['english_multi']} has "
            f"{english_multi.shape[0]}: both must encode the same caption list in the same order"
        )
    n_train, _ = split_sizes(english_clip.shape[0], config)
    if n_train < config.batch_size:
        raise TrainInputError(
            f"{names['english_clip']}: {n_train} training captions (after holding out {config.heldout_fraction:.0%}) "
            f"is fewer than one batch of {config.batch_size}: add captions or lower --batch-size"
        )
    check_feature_array(image_memory, name=names["image_memory"], dim=d_clip, min_rows=config.batch_size)
    check_feature_array(foreign_memory, name=names["foreign_memory"], dim=d_multi, min_rows=config.batch_size)
    return TrainingArrays(english_clip, english_multi, image_memory, foreign_memory)

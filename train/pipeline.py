"""`uclip train`: text files + an image folder (or precomputed feature files) -> trained heads in the bundle.

Stages: read inputs -> extract frozen features once with the bundle's ONNX encoders (cached, resumable)
-> train_heads (retrieval targets computed once, checkpoints every epoch) -> heads written into the bundle.
Nothing pairs an English caption with a foreign sentence or an image: the captions give e_I and e_K
row for row; the image memory and the foreign memory are unordered sets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from uclip_cli import bundle as B
from uclip_cli.config import cache_dir
from uclip_cli.encoders import Encoders
from uclip_cli.pipeline import BatchEncoder, FeatureSink, Preparer, default_workers, run_pipeline, stat_files
from uclip_cli.sessions import SessionFactory
from uclip_cli.walk import walk_images

from .config import ProgressFn, TrainConfig
from .data import TrainInputError, read_captions
from .features import encode_images_to_file, encode_texts_to_file, open_features
from .heads import write_heads_into_bundle
from .trainer import TrainResult, train_heads


@dataclass
class TrainInputs:
    """Each part either as raw inputs (text files / image folders) or as a precomputed .npy feature file."""

    captions: list[Path] = field(default_factory=list)          # English anchor captions, one per line
    english_clip_features: Path | None = None                   # e_I of the captions, [N, d_clip]
    english_multi_features: Path | None = None                  # e_K of the same captions, [N, d_multi]
    images: list[Path] = field(default_factory=list)            # folders of uncaptioned images (image memory)
    image_features: list[Path] = field(default_factory=list)    # or CLIP image features, [M1, d_clip]
    foreign: list[Path] = field(default_factory=list)           # foreign-language sentences, one per line
    foreign_features: list[Path] = field(default_factory=list)  # or multilingual features, [M2, d_multi]


def default_work_dir(bundle: B.Bundle) -> Path:
    return cache_dir() / "train" / bundle.image_fingerprint


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])


class FeatureExtractor:
    """Frozen features from the bundle's ONNX encoders, written to cached, resumable .npy files."""

    def __init__(self, bundle: B.Bundle, encoders: Encoders, work_dir: Path, progress: ProgressFn | None):
        self.bundle, self.encoders, self.work_dir, self.progress = bundle, encoders, work_dir, progress

    def texts(self, texts: list[str], tower: str, name: str) -> np.ndarray:
        encode = self.encoders.clip_text_features if tower == B.TEXT_CLIP else self.encoders.multilingual_features
        report = encode_texts_to_file(texts, encode, self.work_dir / f"{name}.npy",
                                      encoder_id=self.bundle.files[tower], progress=self.progress)
        return open_features(report.path)

    def images(self, folders: list[Path], log: Callable[[str], None]) -> np.ndarray:
        paths = [e.path for e in walk_images(folders)]
        if not paths:
            raise TrainInputError(f"{', '.join(map(str, folders))}: no images found for the image memory")
        skipped: list[str] = []
        preparer, encoder = Preparer(self.bundle.image), BatchEncoder.of(self.encoders, project=False)

        def encode(batch: list[Path]) -> np.ndarray:
            """The image pipeline over one chunk: decoding in threads, then the encoder; undecodable files dropped."""
            sink = FeatureSink()
            run_pipeline(stat_files(batch), preparer, encoder, sink, workers=default_workers(), batch_size=max(1, len(batch)))
            skipped.extend(f"{entry.path}: {reason}" for entry, reason in sink.failed)
            return sink.features(self.bundle.dims["clip"])

        report = encode_images_to_file(paths, encode, self.work_dir / "image_memory.npy",
                                       encoder_id=self.bundle.image_fingerprint, progress=self.progress)
        if report.skipped:
            log(f"image memory: {report.skipped} of {report.items} files could not be decoded and were left out"
                + (f" (first: {skipped[0]})" if skipped else ""))
        return open_features(report.path)


def input_names(inputs: TrainInputs) -> dict[str, str]:
    """What to call each training array in an error message: its file(s), or the inputs it was encoded from."""
    def name(files: list, raw: list, what: str) -> str:
        return ", ".join(map(str, [*files, *raw])) or what

    return {
        "english_clip": name([inputs.english_clip_features] if inputs.english_clip_features else [], inputs.captions, "captions"),
        "english_multi": name([inputs.english_multi_features] if inputs.english_multi_features else [], inputs.captions, "captions"),
        "image_memory": name(inputs.image_features, inputs.images, "image memory"),
        "foreign_memory": name(inputs.foreign_features, inputs.foreign, "foreign memory"),
    }


def gather_features(inputs: TrainInputs, extractor: FeatureExtractor, dims: dict[str, int],
                    log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The four arrays train_heads needs, each from its feature file or extracted from raw inputs."""
    d_clip, d_multi = dims["clip"], dims["multilingual"]
    if inputs.english_clip_features or inputs.english_multi_features:
        if not (inputs.english_clip_features and inputs.english_multi_features):
            raise TrainInputError("--english-clip-features and --english-multi-features go together "
                                  "(the same captions through both encoders)")
        english_clip = open_features(inputs.english_clip_features, dim=d_clip)
        english_multi = open_features(inputs.english_multi_features, dim=d_multi)
    elif inputs.captions:
        captions = [c for f in inputs.captions for c in read_captions(f)]
        log(f"{len(captions)} English captions from {len(inputs.captions)} file(s)")
        english_clip = extractor.texts(captions, B.TEXT_CLIP, "english_clip")
        english_multi = extractor.texts(captions, B.TEXT_MULTILINGUAL, "english_multi")
    else:
        raise TrainInputError("no English captions: pass --captions FILE (or --english-clip-features and --english-multi-features)")

    image_parts = [open_features(p, dim=d_clip) for p in inputs.image_features]
    if inputs.images:
        image_parts.append(extractor.images(inputs.images, log))
    if not image_parts:
        raise TrainInputError("no image memory: pass --images FOLDER (uncaptioned images) or --image-features FILE")

    foreign_parts = [open_features(p, dim=d_multi) for p in inputs.foreign_features]
    if inputs.foreign:
        sentences = [s for f in inputs.foreign for s in read_captions(f)]
        log(f"{len(sentences)} foreign-language sentences from {len(inputs.foreign)} file(s)")
        foreign_parts.append(extractor.texts(sentences, B.TEXT_MULTILINGUAL, "foreign_multi"))
    if not foreign_parts:
        raise TrainInputError("no foreign-text memory: pass --foreign FILE (sentences in the target languages) or --foreign-features FILE")
    return {"english_clip": english_clip, "english_multi": english_multi,
            "image_memory": _concat(image_parts), "foreign_memory": _concat(foreign_parts)}


def _prepare(bundle_dir: Path, inputs: TrainInputs, work_dir: Path | None, sessions: SessionFactory | None,
             progress: ProgressFn | None) -> tuple[B.Bundle, Path, FeatureExtractor]:
    bundle = B.load_bundle(bundle_dir)
    if not bundle.has_clip_text and inputs.captions:
        raise TrainInputError(f"{bundle.path} has no CLIP text tower to encode the English captions: re-export it with `uclip export`")
    work_dir = Path(work_dir) if work_dir else default_work_dir(bundle)
    work_dir.mkdir(parents=True, exist_ok=True)
    return bundle, work_dir, FeatureExtractor(bundle, Encoders(bundle, sessions, batch_size=64), work_dir, progress)


# The feature files the extractor writes into the work folder, by the train_heads argument they feed.
EXTRACTED_FILES = {"english_clip": "english_clip.npy", "english_multi": "english_multi.npy",
                   "image_memory": "image_memory.npy", "foreign_memory": "foreign_multi.npy"}


def extract_features(bundle_dir: Path, inputs: TrainInputs, *, work_dir: Path | None = None,
                     sessions: SessionFactory | None = None, progress: ProgressFn | None = None,
                     log: Callable[[str], None] = lambda m: None) -> dict[str, Path]:
    """Encode the raw inputs once into .npy feature files (to train later, here or elsewhere); returns them."""
    bundle, work_dir, extractor = _prepare(bundle_dir, inputs, work_dir, sessions, progress)
    if inputs.captions:
        captions = [c for f in inputs.captions for c in read_captions(f)]
        extractor.texts(captions, B.TEXT_CLIP, "english_clip")
        extractor.texts(captions, B.TEXT_MULTILINGUAL, "english_multi")
    if inputs.images:
        extractor.images(inputs.images, log)
    if inputs.foreign:
        extractor.texts([s for f in inputs.foreign for s in read_captions(f)], B.TEXT_MULTILINGUAL, "foreign_multi")
    return {k: work_dir / name for k, name in EXTRACTED_FILES.items() if (work_dir / name).is_file()}


def run_training(bundle_dir: Path, inputs: TrainInputs, config: TrainConfig, *, work_dir: Path | None = None,
                 sessions: SessionFactory | None = None, progress: ProgressFn | None = None,
                 log: Callable[[str], None] = lambda m: None) -> TrainResult:
    config.validate()
    bundle, work_dir, extractor = _prepare(bundle_dir, inputs, work_dir, sessions, progress)
    arrays = gather_features(inputs, extractor, bundle.dims, log)
    result = train_heads(arrays["english_clip"], arrays["english_multi"], arrays["image_memory"], arrays["foreign_memory"],
                         config, checkpoint_dir=work_dir / "checkpoints", progress=progress, names=input_names(inputs),
                         dims={"clip": bundle.dims["clip"], "multilingual": bundle.dims["multilingual"]})
    info = result.training_info()
    info["encoders"] = {name: bundle.files[name] for name in (B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL)
                        if name in bundle.files}
    info["feature_sources"] = feature_sources(inputs)
    write_heads_into_bundle(result.heads, bundle.path, info, config=config)
    return result


def feature_sources(inputs: TrainInputs) -> dict[str, str]:
    """Which inputs were encoded by this bundle ("bundle") and which came as feature files ("files")."""
    def source(raw: bool, files: bool) -> str:
        return "+".join(s for s, used in (("bundle", raw), ("files", files)) if used)

    return {"english": source(bool(inputs.captions) and not inputs.english_clip_features, bool(inputs.english_clip_features)),
            "image_memory": source(bool(inputs.images), bool(inputs.image_features)),
            "foreign_memory": source(bool(inputs.foreign), bool(inputs.foreign_features))}

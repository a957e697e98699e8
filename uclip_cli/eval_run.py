"""`uclip eval`: the paper's protocol run with a bundle's ONNX encoders (metrics live in evaluate.py).

Image features can be extracted once and saved (`--save-features`) as an .npz holding `keys` (image
names) and `features` (frozen CLIP image features, [N, d_clip]); a later evaluation, e.g. after
retraining the heads, reads them back (`--features`) and decodes no image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .evaluate import (EvaluationError, check_prompts, evaluate_classification, evaluate_retrieval, load_captions,
                       load_prompts, match_image_files, read_class_folder)
from .image_pipeline import BatchEncoder, FeatureSink, Preparer, default_workers, run_pipeline, save_feature_file, stat_files
from .progress import Progress
from .sessions import SessionFactory


def extract_image_features(paths: Sequence[Path], bundle: B.Bundle, encoders: Encoders, *, batch_size: int = 32,
                           progress: bool = True, workers: int | None = None) -> tuple[list[int], np.ndarray, list[str]]:
    """Frozen image features of the decodable paths: (indices kept, [n, d_clip], 'path: reason' of the others).

    The image pipeline's stages: decoding in threads ahead of the encoder, features into a FeatureSink.
    """
    entries = stat_files(paths)
    position = {id(e): i for i, e in enumerate(entries)}
    sink = FeatureSink()
    bar = Progress("encoding images", len(entries), enabled=progress)
    run_pipeline(entries, Preparer(bundle.image), BatchEncoder.of(encoders, project=False), sink,
                 workers=workers or default_workers(), batch_size=batch_size, on_item=lambda _: bar.advance())
    bar.close()
    kept = [position[id(e)] for e in sink.entries]
    failed = [f"{paths[position[id(e)]]}: {reason}" for e, reason in sink.failed]
    return kept, sink.features(bundle.dims["clip"]), failed


def load_feature_file(path: Path, d_clip: int) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features = [str(k) for k in data["keys"]], np.asarray(data["features"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"{path}: not a feature file written by `uclip eval --save-features` ({e})") from None
    if features.ndim != 2 or features.shape[1] != d_clip or len(keys) != features.shape[0]:
        raise EvaluationError(f"{path}: features of shape {features.shape} for {len(keys)} keys do not fit this bundle "
                              f"({d_clip}-d CLIP features): extract them again with this bundle")
    return keys, features


def _text_encoder(encoders: Encoders) -> Callable[[list[str], str], np.ndarray]:
    return lambda texts, lang: encoders.encode_text_query(texts)


def run_retrieval_eval(*, bundle_path: Path, captions_file: Path, languages: Sequence[str], images: Path | None,
                       features_file: Path | None, save_features: Path | None, sessions: SessionFactory,
                       progress: bool = True, log: Callable[[str], None] = lambda m: None) -> dict:
    bundle = B.load_bundle(bundle_path)
    encoders = Encoders(bundle, sessions)
    if not bundle.has_heads and any(lang != "en" for lang in languages):
        log("note: the bundle has no trained heads: non-English captions go through CLIP's English text tower")
    captions = load_captions(captions_file, languages)
    failed: list[str] = []
    if features_file:
        keys, features = load_feature_file(features_file, bundle.dims["clip"])
    elif images:
        found, _missing = match_image_files(images, captions.images)
        keys = list(found)
        kept, features, failed = extract_image_features([found[k] for k in keys], bundle, encoders, progress=progress)
        keys = [keys[i] for i in kept]
        if save_features:
            save_feature_file(save_features, keys, features)
    else:
        raise EvaluationError("give --images FOLDER or --features FILE")
    vectors = encoders.project_image(features) if len(features) else features
    report = evaluate_retrieval((keys, vectors), captions, _text_encoder(encoders), languages)
    report["undecodable_images"] = failed
    report["bundle"] = {"path": str(bundle.path), "fingerprint": bundle.fingerprint, "space": encoders.space}
    return report


def run_classification_eval(*, bundle_path: Path, images: Path, prompts_file: Path, languages: Sequence[str] | None,
                            sessions: SessionFactory, progress: bool = True) -> dict:
    bundle = B.load_bundle(bundle_path)
    encoders = Encoders(bundle, sessions)
    folder = read_class_folder(images)
    prompts = load_prompts(prompts_file)
    languages = check_prompts(prompts, folder.class_names, languages)   # before any image is encoded
    kept, features, failed = extract_image_features(folder.paths, bundle, encoders, progress=progress)
    if not kept:
        raise EvaluationError(f"{images}: none of the images could be decoded")
    report = evaluate_classification(encoders.project_image(features), folder.labels[kept], folder.class_names,
                                     prompts, _text_encoder(encoders), languages)
    report["undecodable_images"] = failed
    report["empty_classes"] = folder.empty_classes
    report["bundle"] = {"path": str(bundle.path), "fingerprint": bundle.fingerprint, "space": encoders.space}
    return report

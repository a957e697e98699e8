"""Caption text that ships with uclip: the fitting half of XM3600's captions (CC BY 4.0).

The default model's heads are fitted on the user's machine (assemble.py), in closed form, from text
alone: English captions encoded by both text towers (the anchors) and captions in other languages
(the language subspace Head_A removes). That text ships in the wheel, so the first query works in
every language without a download beyond the towers, and `uclip train --recipe xm3600` works offline.

Source: Crossmodal-3600 (Thapliyal, Pont-Tuset, Chen, Soricut, EMNLP 2022; CC BY 4.0): 3,600 images,
one native caption per image in each of 36 languages (each written for the image in that language,
not translated). The images are not included, and none is needed.

The split is fixed and written down so that evaluation never sees fitted text: order the 3,600 images
by the sha256 of their file name (hex digest, ascending); the FIRST 1,800 are held out (`uclip eval`,
bench/), the LAST 1,800 are the fitting half shipped in `data/xm3600-fit.jsonl.gz`
(`split_xm3600`). bench/bench_realtext.py orders images the same way, so its test images (its first
600) are all in the held-out half.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Iterable

SHIPPED_FILE = "xm3600-fit.jsonl.gz"
SOURCE = "XM3600 (Thapliyal et al., EMNLP 2022; CC BY 4.0): the fitting half of its images, 36 languages"
HELD_OUT_IMAGES = 1800


def image_order_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def split_xm3600(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(held_out, fit): XM3600 records ({"image", "captions"}) in the fixed split described above."""
    ordered = sorted(records, key=lambda r: image_order_key(r["image"]))
    return ordered[:HELD_OUT_IMAGES], ordered[HELD_OUT_IMAGES:]


def write_fit_half(captions_jsonl: Path, out: Path) -> int:
    """Write the fitting half of an XM3600 captions.jsonl as the shipped file; returns the images written."""
    with open(captions_jsonl, encoding="utf-8") as f:
        _, fit = split_xm3600(json.loads(line) for line in f if line.strip())
    with gzip.GzipFile(out, "wb", mtime=0) as raw:   # the same input gives the same bytes
        for record in fit:
            raw.write((json.dumps({"image": record["image"], "captions": record["captions"]}, ensure_ascii=False,
                                  sort_keys=True) + "\n").encode("utf-8"))
    return len(fit)


@cache
def shipped_records() -> tuple[dict, ...]:
    """The shipped fitting half: one {"image", "captions": {language: caption}} per image."""
    data = resources.files(__package__).joinpath("data", SHIPPED_FILE).read_bytes()
    return tuple(json.loads(line) for line in gzip.decompress(data).decode("utf-8").splitlines() if line)


def shipped_captions(language: str) -> list[str]:
    """Every shipped caption in `language` (one per image that has one), in the file's order."""
    return [r["captions"][language] for r in shipped_records() if r["captions"].get(language)]


def shipped_languages() -> list[str]:
    return sorted({lang for r in shipped_records() for lang in r["captions"]})

"""Runs `uclip train` against a local stand-in for the Hugging Face hub, in its own process.

huggingface_hub and datasets read HF_ENDPOINT when they are imported, so a test process that imported
them before (transformers does) cannot point them elsewhere: test_train_sources.py runs this file as a
subprocess. It serves tiny copies of the datasets a recipe names (same repo names, configs, splits and
column shapes as their dataset cards), runs each scenario through `uclip_cli.cli.main` as a user would,
and prints one JSON object: scenario -> {code, stdout, stderr}, plus the hub requests seen.

    python hub_train_driver.py HOME BUNDLE INDEX
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_dataset_hub import FakeDatasetHub, FakeRepo, parquet_bytes  # noqa: E402

COCO_CAPTIONS = [[f"a {c} {t} on the grass", f"the {c} {t} is outside", f"one {c} {t}"]
                 for c in ("red", "blue", "green", "white", "black", "grey") for t in ("dog", "cat", "car", "boat", "bird")]
CZECH = [f"{c} {t} na trávě" for c in ("červený", "modrý", "zelený", "bílý") for t in ("pes", "kočka", "auto", "loď", "pták")]
OPUS_README = b"""---
configs:
- config_name: cs-en
  data_files:
  - split: train
    path: cs-en/train-*
  - split: test
    path: cs-en/test-*
- config_name: en-fi
  data_files:
  - split: train
    path: en-fi/train-*
---
"""


def hub_repos() -> dict[str, FakeRepo]:
    """Tiny parquet copies of the recipes' datasets, shaped as their cards say."""
    coco = parquet_bytes({"filepath": ["train2014"] * len(COCO_CAPTIONS),
                          "filename": [f"COCO_{i:06d}.jpg" for i in range(len(COCO_CAPTIONS))],
                          "sentences": COCO_CAPTIONS, "cocoid": list(range(len(COCO_CAPTIONS)))})
    opus_cs = parquet_bytes({"translation": [{"cs": s, "en": f"english {i}"} for i, s in enumerate(CZECH)]})
    opus_fi = parquet_bytes({"translation": [{"en": f"english {i}", "fi": f"suomi {i}"} for i in range(20)]})
    return {
        "yerevann/coco-karpathy": FakeRepo({"data/train-00000-of-00001.parquet": coco,
                                            "data/test-00000-of-00001.parquet": coco}),
        "Helsinki-NLP/opus-100": FakeRepo({"README.md": OPUS_README, "cs-en/train-00000-of-00001.parquet": opus_cs,
                                           "cs-en/test-00000-of-00001.parquet": opus_cs,
                                           "en-fi/train-00000-of-00001.parquet": opus_fi}),
    }


def run(argv: list[str]) -> dict:
    from uclip_cli.cli import main

    import contextlib
    import io

    import time

    out, err = io.StringIO(), io.StringIO()
    code, started = 0, time.perf_counter()
    saved = sys.argv
    sys.argv = ["uclip", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": time.perf_counter() - started}


def main(home: Path, bundle: Path, index: Path) -> None:
    common = ["--bundle", str(bundle), "--index", str(index), "--work-dir", str(home / "work"), "--epochs", "1",
              "--no-progress"]
    results: dict = {}
    (home / "cs.txt").write_text("\n".join(CZECH), encoding="utf-8")
    local_foreign = ["--foreign", f"cs={home / 'cs.txt'}"]
    with FakeDatasetHub(hub_repos()) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        results["recipe"] = run(["train", "--recipe", "cs-opus", *common])
        results["captions_spec"] = run(["train", "--captions", "hf://datasets/yerevann/coco-karpathy:test:sentences",
                                        "--foreign", "fi=hf://datasets/Helsinki-NLP/opus-100/en-fi:train:translation.fi",
                                        "--max-rows", "40", *common])
        results["unknown_dataset"] = run(["train", *local_foreign, "--captions", "hf://datasets/nobody/nothing:train:text", *common])
        results["missing_column"] = run(["train", *local_foreign, "--captions", "hf://datasets/yerevann/coco-karpathy:train:caption", *common])
        results["unknown_split"] = run(["train", *local_foreign, "--captions", "hf://datasets/yerevann/coco-karpathy:val:sentences", *common])
        results["requests"], results["unexpected"] = list(hub.requests), list(hub.unexpected)
    # the hub is gone now (nothing listens at HF_ENDPOINT): the cached texts serve, anything new fails in one line
    results["offline_recipe"] = run(["train", "--recipe", "cs-opus", *common])
    results["offline_uncached"] = run(["train", "--recipe", "hu-opus", *common])
    print(json.dumps(results))


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))

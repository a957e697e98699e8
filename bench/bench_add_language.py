"""How long does "add a language" take on this machine? `uclip train`'s stages, timed, per 10,000 captions.

What a user runs:  uclip train --captions en.txt --foreign cs=cs.txt     (image memory: their index)
This script runs the same code (uclip_cli.train.pipeline, stage by stage) on the full-size random-weight
bundle of bench/common.py (CLIP ViT-B/32 text tower 63 M parameters, a multilingual tower of
paraphrase-multilingual-MiniLM-L12-v2's shape, 118 M), with XM3600 captions as text (English captions,
Czech captions of *other* images as the foreign memory; repeated with a counter when more are asked
for than XM3600 holds) and a synthetic 10,000-photo index as the image memory. Random weights encode as
fast as real ones; the number of training steps is the schedule's (early stopping aside: random-weight
features give the held-out loss nothing to learn, so the full budget is timed).

    python bench/bench_add_language.py                       # 2,000 captions + 2,000 foreign sentences
    python bench/bench_add_language.py --captions 10000 --foreign 10000 --threads 2

Prints each stage's wall seconds, CPU seconds (of this process: on a busy shared machine the wall time
grows with the load, the CPU time much less) and rate, the CPU model and the load average; extraction
scales with the number of texts, training with the step budget (max(1,000 steps, 5 epochs)), not with
the captions.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
from common import CACHE, bundle, cpu_model, load_note, say, synthetic_index

XM3600 = Path("/work/shared/data/xm3600/captions.jsonl")


def texts(language: str, n: int, skip: int = 0) -> list[str]:
    rows = [json.loads(line)["captions"] for line in XM3600.read_text(encoding="utf-8").splitlines()]
    base = [r[language] for r in rows[skip:] if language in r] or [f"caption {language}"]
    return [base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--foreign", type=int, default=2000)
    parser.add_argument("--photos", type=int, default=10_000, help="rows of the synthetic index (the image memory)")
    parser.add_argument("--threads", type=int, default=None, help="default: uclip's (physical cores)")
    parser.add_argument("--max-steps", type=int, default=None, help="time fewer steps and scale (default: the whole budget)")
    args = parser.parse_args()

    import torch

    from uclip_cli.sessions import SessionFactory
    from uclip_cli.threads import resolve_threads
    from uclip_cli.train.config import TrainConfig
    from uclip_cli.train.pipeline import TrainSources, _prepare, gather_features, plan_inputs
    from uclip_cli.train.trainer import train_heads

    threads, _ = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    source_bundle = bundle()
    index = synthetic_index(source_bundle, args.photos)
    print(f"{cpu_model()}, {threads} threads; {load_note()} at start")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        work = shutil.copytree(source_bundle, tmp / "bundle")      # training writes heads: never into the shared one
        (tmp / "en.txt").write_text("\n".join(texts("en", args.captions)), encoding="utf-8")
        (tmp / "cs.txt").write_text("\n".join(texts("cs", args.foreign, skip=1800)), encoding="utf-8")
        sources = TrainSources(captions=[str(tmp / "en.txt")], foreign=[f"cs={tmp / 'cs.txt'}"], index=index)
        b, work_dir, extractor = _prepare(work, tmp / "work", SessionFactory(device="cpu", threads=threads), None)
        # timed steps: the whole budget, or --max-steps of it; no early stopping (random features teach nothing)
        timed = TrainConfig(device="cpu", max_steps=args.max_steps, patience=10**9, refine=True)
        planned, config = plan_inputs(sources, b, timed, log=say, progress=None)

        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}
        real_texts = extractor.texts

        def timed_texts(items, tower, name):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = real_texts(items, tower, name)
            timings[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
            return out

        extractor.texts = timed_texts
        inputs = gather_features(planned, sources, extractor, say)
        start_cpu = time.process_time()
        result = train_heads(inputs, config)
        cpu["train"] = time.process_time() - start_cpu
        budget = TrainConfig().steps_budget(result.steps_per_epoch)       # the default schedule's budget

    per_10k = lambda seconds, n: seconds * 10_000 / n
    rows = [
        ("captions, CLIP text tower", timings["english_clip"], args.captions),
        ("captions, multilingual tower", timings["english_multi"], args.captions),
        ("foreign sentences, multilingual tower", timings["foreign_multi"], args.foreign),
    ]
    print(f"\n{'stage':<40} {'seconds':>8} {'CPU s':>8} {'texts/s':>8} {'s per 10k texts':>16} {'CPU s per 10k':>14}")
    for (name, seconds, n), key in zip(rows, ("english_clip", "english_multi", "foreign_multi")):
        print(f"{name:<40} {seconds:8.1f} {cpu[key]:8.1f} {n / seconds:8.1f} {per_10k(seconds, n):16.0f} "
              f"{per_10k(cpu[key], n):14.0f}")
    t = result.timings
    step_s = t["train_s"] / max(result.steps, 1)
    print(f"{'retrieval targets (once)':<40} {t['retrieval_s']:8.1f}")
    print(f"training: {result.steps} steps of batch {result.config.batch_size} in {t['train_s']:.1f} s "
          f"({cpu['train']:.1f} CPU s with retrieval and evaluations) "
          f"({1 / step_s:.2f} steps/s); the default budget here is {budget} steps = {budget * step_s / 60:.1f} min; "
          f"held-out evaluations {t['eval_s']:.1f} s")
    extraction_10k = per_10k(timings["english_clip"] + timings["english_multi"], args.captions) \
        + per_10k(timings["foreign_multi"], args.foreign)
    print(f"\nadd a language, per 10,000 captions + 10,000 foreign sentences: {extraction_10k / 60:.1f} min of encoding "
          f"(once; cached) + {budget * step_s / 60:.1f} min of training at most (the {budget}-step budget)")
    print(f"{load_note()} at end")


if __name__ == "__main__":
    sys.exit(main())

"""Does the uCLIP trainer learn what the method promises? Measured in a synthetic world.

Trains the heads on unpaired data of a synthetic world (uclip_cli.train.synthetic) and prints
foreign-language retrieval (text->image and image->text Recall@1/5/10) on held-out meanings for:
untrained heads, the full method, each ablation and an oracle trained on true foreign-photo pairs.
Mean ± std over seeds (each seed draws a new world and a new initialisation).

    python bench/bench_synthetic.py                       # 3 seeds, default world (a few minutes on 2 cores)
    python bench/bench_synthetic.py --seeds 0 1 2 3 4 --json out.json
    python bench/bench_synthetic.py --world language_distortion=1.0 --train epochs=20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch

from uclip_cli.train.synthetic import (
    VARIANTS,
    WorldConfig,
    evaluate_heads,
    generate_world,
    synthetic_train_config,
    train_variant,
)

METRICS = ("R@1", "R@5", "R@10")


def _parse_overrides(pairs: list[str], cls) -> dict:
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types or not value:
            raise SystemExit(f"--{cls.__name__}: {pair!r} is not name=value of a known setting ({', '.join(types)})")
        out[name] = json.loads(value) if value[0] in "[{\"" or value in ("true", "false", "null") else _number(value)
    return out


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        return float(value)


def run(seeds: list[int], world_overrides: dict, train_overrides: dict, variants=VARIANTS) -> dict:
    """results[variant][seed] = evaluate_heads report (per language + 'average'), plus seconds."""
    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    for seed in seeds:
        data = generate_world(replace(WorldConfig(seed=seed), **world_overrides))
        config = synthetic_train_config(seed=seed, **train_overrides)
        for variant in variants:
            start = time.perf_counter()
            heads = train_variant(data, variant, config)
            report = evaluate_heads(heads, data, ["en", *data.config.languages])
            report["seconds"] = time.perf_counter() - start
            results[variant][seed] = report
            print(f"  seed {seed} {variant:16s} t2i R@1 {report['average']['t2i']['R@1']:5.1f}  "
                  f"({report['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return results


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):5.1f} ± {np.std(values):4.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def average_table(results: dict) -> str:
    header = ["variant", *(f"t2i {m}" for m in METRICS), *(f"i2t {m}" for m in METRICS)]
    rows = []
    for variant, by_seed in results.items():
        reports = list(by_seed.values())
        cells = [_mean_std([r["average"][d][m] for r in reports]) for d in ("t2i", "i2t") for m in METRICS]
        rows.append([variant, *cells])
    return _table(header, rows)


def language_table(results: dict, direction: str = "t2i", metric: str = "R@1") -> str:
    languages = [k for k in next(iter(next(iter(results.values())).values())) if k not in ("average", "seconds")]
    header = ["variant", *languages, "avg (foreign)"]
    rows = []
    for variant, by_seed in results.items():
        reports = list(by_seed.values())
        rows.append([variant, *(_mean_std([r[lang][direction][metric] for r in reports]) for lang in [*languages, "average"])])
    return _table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", nargs="*", default=[], metavar="NAME=VALUE", help="WorldConfig overrides")
    parser.add_argument("--train", nargs="*", default=[], metavar="NAME=VALUE", help="TrainConfig overrides")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="also write every per-seed report here")
    args = parser.parse_args(argv)

    from uclip_cli.train.config import TrainConfig

    world_overrides = _parse_overrides(args.world, WorldConfig)
    train_overrides = _parse_overrides(args.train, TrainConfig)
    torch.set_num_threads(1)   # tiny matrices: thread synchronisation would cost more than it saves
    world = replace(WorldConfig(), **world_overrides)
    train = synthetic_train_config(**train_overrides)
    print(f"world: {asdict(world)}")
    print(f"train: {train.to_dict()}")
    start = time.perf_counter()
    results = run(args.seeds, world_overrides, train_overrides, args.variants)
    print(f"\nforeign languages {', '.join(world.languages)}, {world.n_test} held-out meanings, "
          f"seeds {args.seeds} (mean ± std), {time.perf_counter() - start:.0f} s in all\n")
    print("average over foreign languages\n" + average_table(results))
    for direction in ("t2i", "i2t"):
        for metric in ("R@1", "R@10"):
            print(f"\n{direction} {metric} per language (en: English through the multilingual encoder, for reference)")
            print(language_table(results, direction, metric))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": asdict(world), "train": train.to_dict(),
                       "results": {v: {str(s): r for s, r in by.items()} for v, by in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

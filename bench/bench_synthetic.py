"""Does the uCLIP trainer learn what the method promises? Measured in a synthetic world.

Trains the heads on unpaired data of a synthetic world (uclip_cli.train.synthetic) and prints
foreign-language retrieval (text->image and image->text Recall@1/5/10) on held-out meanings for:
untrained heads, the full method, each ablation and an oracle trained on true foreign-photo pairs.
Mean ± std over seeds (each seed draws a new world and a new initialisation).

    python bench/bench_synthetic.py                       # 3 seeds, default world (a few minutes on 2 cores)
    python bench/bench_synthetic.py --seeds 0 1 2 3 4 --json out.json
    python bench/bench_synthetic.py --world language_distortion=1.0 --train epochs=20
    python bench/bench_synthetic.py --diagnose            # also: pseudo-pair quality, gradient of each loss term
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
    FULL,
    VARIANTS,
    WorldConfig,
    evaluate_heads,
    generate_world,
    pseudo_pair_quality,
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


def _paired_delta(results: dict, variant: str, direction: str, metric: str) -> str:
    """variant minus full, seed by seed (same world, same initialisation), mean ± std."""
    if FULL not in results:
        return "-"
    seeds = results[variant].keys() & results[FULL].keys()
    deltas = [results[variant][s]["average"][direction][metric] - results[FULL][s]["average"][direction][metric] for s in seeds]
    return f"{np.mean(deltas):+5.1f} ± {np.std(deltas):4.1f}"


def average_table(results: dict) -> str:
    header = ["variant", *(f"t2i {m}" for m in METRICS), *(f"i2t {m}" for m in METRICS),
              "Δ t2i R@1 vs full", "Δ t2i R@10 vs full"]
    rows = []
    for variant, by_seed in results.items():
        reports = list(by_seed.values())
        cells = [_mean_std([r["average"][d][m] for r in reports]) for d in ("t2i", "i2t") for m in METRICS]
        rows.append([variant, *cells, *(_paired_delta(results, variant, "t2i", m) for m in ("R@1", "R@10"))])
    return _table(header, rows)


def language_table(results: dict, direction: str = "t2i", metric: str = "R@1") -> str:
    languages = [k for k in next(iter(next(iter(results.values())).values())) if k not in ("average", "seconds")]
    header = ["variant", *languages, "avg (foreign)"]
    rows = []
    for variant, by_seed in results.items():
        reports = list(by_seed.values())
        rows.append([variant, *(_mean_std([r[lang][direction][metric] for r in reports]) for lang in [*languages, "average"])])
    return _table(header, rows)


def term_gradient_norms(data, config, n_batches: int = 8) -> dict[str, float]:
    """Gradient norm over all head parameters of each weighted loss term (text, pseudo, lambda*intra),
    for the trained full-method heads, BatchNorm in train mode, mean over batches of anchors."""
    from uclip_cli.train.losses import uclip_losses
    from uclip_cli.train.retrieval import precompute_targets

    heads = train_variant(data, FULL, config).train()
    inputs = [torch.from_numpy(x) for x in (
        data.anchor_clip, data.anchor_multi,
        precompute_targets(data.anchor_clip, data.image_memory, config.tau_retrieval),
        precompute_targets(data.anchor_multi, data.foreign_memory, config.tau_retrieval),
    )]
    weights = {"text": 1.0, "pseudo": 1.0, "intra": config.lambda_intra}
    norms = {name: [] for name in weights}
    order = torch.randperm(inputs[0].shape[0], generator=torch.Generator().manual_seed(0))
    for b in range(n_batches):
        e_I, e_K, v, k = (x[order[b * config.batch_size:(b + 1) * config.batch_size]] for x in inputs)
        for name, weight in weights.items():
            heads.zero_grad()
            terms = uclip_losses(heads.head_a(e_K), heads.head_b(e_I), heads.head_a(k), heads.head_b(v), config)
            (weight * terms[name]).backward()
            norms[name].append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in heads.parameters() if p.grad is not None))))
    return {name: float(np.mean(v)) for name, v in norms.items()}


def diagnose(seed: int, world_overrides: dict, train_overrides: dict) -> None:
    data = generate_world(replace(WorldConfig(seed=seed), **world_overrides))
    config = synthetic_train_config(seed=seed, **train_overrides)
    quality = pseudo_pair_quality(data, config.tau_retrieval)
    print(f"\ndiagnosis (seed {seed})")
    print("pseudo pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))
    grads = term_gradient_norms(data, config)
    print("gradient norm of each weighted term, trained full heads: " + ", ".join(f"{k} {v:.4f}" for k, v in grads.items()))


def report(results: dict, world: WorldConfig, seeds: list[int], seconds: float | None) -> None:
    took = f", {seconds:.0f} s in all" if seconds is not None else ""
    print(f"\nforeign languages {', '.join(world.languages)}, {world.n_test} held-out meanings, "
          f"seeds {seeds} (mean ± std; Δ paired by seed){took}\n")
    print("average over foreign languages\n" + average_table(results))
    for direction in ("t2i", "i2t"):
        for metric in ("R@1", "R@10"):
            print(f"\n{direction} {metric} per language (en: English through the multilingual encoder, for reference)")
            print(language_table(results, direction, metric))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", nargs="*", default=[], metavar="NAME=VALUE", help="WorldConfig overrides")
    parser.add_argument("--train", nargs="*", default=[], metavar="NAME=VALUE", help="TrainConfig overrides")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="also write every per-seed report here")
    parser.add_argument("--diagnose", action="store_true", help="also print pseudo-pair quality and per-term gradients")
    parser.add_argument("--from-json", help="print the tables of an earlier --json run instead of training")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        world = WorldConfig(**{**saved["world"], "languages": tuple(saved["world"]["languages"])})
        report(saved["results"], world, [int(s) for s in next(iter(saved["results"].values()))], None)
        return

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
    report(results, world, args.seeds, time.perf_counter() - start)
    if args.diagnose:
        diagnose(args.seeds[0], world_overrides, train_overrides)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": asdict(world), "train": train.to_dict(),
                       "results": {v: {str(s): r for s, r in by.items()} for v, by in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

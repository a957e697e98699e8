"""What `uclip dupes` costs (issue 23, item 3): blocked exact similarity over every pair of photos.

    python bench/bench_dupes.py [--rows 100000] [--dim 512] [--planted 2000] [--threshold 0.95] [--no-store]

`--rows` synthetic unit vectors of `--dim` (CLIP ViT-B/32's image features: 512) made to look like CLIP
features: each photo is one of 50 "topics" plus its own part, so unrelated photos of one topic sit near
cosine 0.5, as real ones do. `--planted` near-duplicate clusters of 2 to 6 photos (an original and copies
with a little noise: cosine 0.96 to 0.995 to it) are hidden among them at random rows. Printed: the CPU,
the seconds of dupes.similar_pairs + components (the matrix work, float32 numpy on all cores), the groups
found vs planted (and how many planted clusters came back whole), then (unless --no-store) the same through
an index written by IndexStore and read as `uclip dupes` reads it: dupes.find_dupes, catalogue and all.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_note, load_note
from uclip_cli.dupes import components, find_dupes, similar_pairs
from uclip_cli.index.access import open_index
from uclip_cli.index.identity import IndexIdentity
from uclip_cli.index.records import Embedded, PhotoMeta
from uclip_cli.walk import FileEntry

TOPICS = 50


def synthetic(rows: int, dim: int, planted: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unit vectors and the planted clusters (row arrays)."""
    topics = rng.standard_normal((TOPICS, dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    own = rng.standard_normal((rows, dim), dtype=np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    x = 0.7 * topics[rng.integers(TOPICS, size=rows)] + 0.7 * own
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(rows)
    clusters, used = [], 0
    for _ in range(planted):
        size = int(rng.integers(2, 7))
        members = np.sort(order[used:used + size])
        used += size
        base = x[members[0]]
        for m in members[1:]:
            target = rng.uniform(0.96, 0.995)        # the copy's cosine to the original
            noise = rng.standard_normal(dim).astype(np.float32)
            noise -= (noise @ base) * base
            noise /= np.linalg.norm(noise)
            x[m] = target * base + np.sqrt(1 - target ** 2) * noise
        clusters.append(members)
    return x.astype(np.float32), clusters


def compare(found: list[np.ndarray], clusters: list[np.ndarray]) -> str:
    got = {tuple(g.tolist()) for g in found}
    whole = sum(tuple(c.tolist()) in got for c in clusters)
    return f"groups found {len(found)} vs planted {len(clusters)} ({whole} planted clusters found whole)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--no-store", action="store_true", help="Only the matrix work, no index on disk.")
    args = parser.parse_args()
    print(cpu_note())
    print(load_note())
    rng = np.random.default_rng(0)
    x, clusters = synthetic(args.rows, args.dim, args.planted, rng)
    started = time.perf_counter()
    i, j = similar_pairs(x, args.threshold)
    found = components(len(x), i, j)
    seconds = time.perf_counter() - started
    print(f"similar_pairs + components: {args.rows} rows x {args.dim} dims at cosine >= {args.threshold}: "
          f"{seconds:.2f} s, {len(i)} pairs; {compare(found, clusters)}")
    if args.no_store:
        print(load_note())
        return
    with tempfile.TemporaryDirectory() as tmp:
        identity = IndexIdentity("img", "heads", args.dim, args.dim, "bench")
        with open_index(Path(tmp) / "index", identity, "create") as store:
            for start in range(0, args.rows, 8192):
                part = x[start:start + 8192]
                meta = PhotoMeta(taken="2024-06-01T12:00:00", taken_source="exif", width=4000, height=3000)
                entries = [Embedded(FileEntry(path=Path(f"/p/{start + k}.jpg"), root=Path("/p"), size=1, mtime_ns=1),
                                    f"{start + k:032x}", meta) for k in range(len(part))]
                store.add_batch(entries, part, part)
        with open_index(Path(tmp) / "index") as store:
            started = time.perf_counter()
            result = find_dupes(store, args.threshold)
            seconds = time.perf_counter() - started
        groups = [np.asarray(sorted(int(m.paths[0][3:-4]) for m in g.members)) for g in result.groups]
        print(f"find_dupes through the index (catalogue, metadata, grouping): {seconds:.2f} s; "
              f"{compare(groups, clusters)}")
    print(load_note())


if __name__ == "__main__":
    main()

"""What `uclip dupes` costs (issue 23, item 3), and what its fast way finds against comparing every pair.

    python bench/bench_dupes.py [--rows 100000] [--dim 512] [--planted 2000] [--threshold 0.95]
                                [--recall-rows 20000] [--exact-too] [--no-store]

`--rows` synthetic unit vectors of `--dim` (CLIP ViT-B/32's image features: 512) made to look like CLIP
features: each photo is one of 50 "topics" plus its own part, so unrelated photos of one topic sit near
cosine 0.5, as real ones do. `--planted` near-duplicate clusters of 2 to 6 photos (an original and copies
with a little noise: cosine 0.96 to 0.995 to it) are hidden among them at random rows. Printed: the CPU,
the seconds of the pair search + components (the matrix work, float32 numpy on all cores) and the CPU
seconds they took (all threads: on a loaded machine the wall time mostly measures the neighbours), the groups
found vs planted (and how many planted clusters came back whole), for the cell-probed search (near_pairs.
probed_pairs, what `uclip dupes` runs above EXACT_ROWS photos) and, with --exact-too, for every pair compared
(exact_pairs, `--exact`: ~45 s at 100,000 on 2 vCPUs) in the same run. Then the pair recall of the probed
search against every pair at `--recall-rows` rows (where the exact way is cheap) at cosine 0.95, 0.9 and 0.8,
over clusters whose copies lie anywhere from 0.8 to 0.995 from their original (pairs on both sides of each
threshold), and that it reports no pair the exact way does not. Then (unless --no-store) the same through an index written
by IndexStore and read as `uclip dupes` reads it: dupes.find_dupes, catalogue and all.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_note, load_note
from uclip_cli.dupes import components, find_dupes
from uclip_cli.index.access import open_index
from uclip_cli.index.identity import IndexIdentity
from uclip_cli.index.records import Embedded, PhotoMeta
from uclip_cli.near_pairs import exact_pairs, probed_pairs
from uclip_cli.walk import FileEntry

TOPICS = 50


def synthetic(rows: int, dim: int, planted: int, rng: np.random.Generator,
              closeness: tuple[float, float] = (0.96, 0.995)) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unit vectors and the planted clusters (row arrays): each copy at a cosine drawn from `closeness` to its
    cluster's original."""
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
            target = rng.uniform(*closeness)        # the copy's cosine to the original
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


def recall(args) -> None:
    """Pairs the probed search finds / pairs at the threshold (every pair compared), at --recall-rows rows."""
    # copies from cosine 0.8 to 0.995 to their original: pairs on both sides of each threshold
    x, _ = synthetic(args.recall_rows, args.dim, args.recall_rows // 50, np.random.default_rng(1), (0.8, 0.995))
    for threshold in (0.95, 0.9, 0.8):
        started = time.perf_counter()
        want = set(zip(*(a.tolist() for a in exact_pairs(x, threshold))))
        middle = time.perf_counter()
        got = set(zip(*(a.tolist() for a in probed_pairs(x, threshold))))
        done = time.perf_counter()
        print(f"pair recall at {args.recall_rows} rows, cosine >= {threshold}: {len(got & want)} of {len(want)} "
              f"({len(got & want) / max(len(want), 1):.4f}); reported beyond the exact pairs: {len(got - want)}; "
              f"exact {middle - started:.2f} s, probed {done - middle:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--recall-rows", type=int, default=20_000, help="Rows for the pair recall against every pair.")
    parser.add_argument("--exact-too", action="store_true", help="Also compare every pair at --rows (slow).")
    parser.add_argument("--no-store", action="store_true", help="Only the matrix work, no index on disk.")
    args = parser.parse_args()
    print(cpu_note())
    print(load_note())
    rng = np.random.default_rng(0)
    x, clusters = synthetic(args.rows, args.dim, args.planted, rng)
    ways = [("probed_pairs", probed_pairs)] + ([("exact_pairs", exact_pairs)] if args.exact_too else [])
    for name, way in ways:
        started, cpu = time.perf_counter(), time.process_time()
        i, j = way(x, args.threshold)
        found = components(len(x), i, j)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"{name} + components: {args.rows} rows x {args.dim} dims at cosine >= {args.threshold}: "
              f"{seconds:.2f} s ({cpu:.2f} s of CPU, all threads), {len(i)} pairs; {compare(found, clusters)}; "
              f"{load_note()}")
    recall(args)
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

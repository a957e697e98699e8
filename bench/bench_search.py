"""Warm exact search over stored float32 vectors: uclip's top_k against a full numpy sort.

    python bench/bench_search.py [--sizes 100000 1000000] [--dim 512] [--k 10] [--repeats 15]

The vectors live in a float32 file opened as np.memmap, as `uclip query` reads them, and are read
once before timing (warm page cache). Also printed: the bare matrix-vector product, which is the
memory-bandwidth floor of any exact float32 scan on this machine. The methods take turns on each
query, so a busy machine slows them alike and their ratios stay meaningful.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from uclip_cli.search import top_k


def write_vectors(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 65536) -> np.memmap:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            block = rng.random((min(chunk, n - start), dim), dtype=np.float32) - 0.5
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            f.write(block.tobytes())
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))


def median_ms(methods: dict, queries) -> dict[str, float]:
    """Median time per method; methods take turns on each query, so background load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for q in queries:
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(q)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(n: int, dim: int, k: int, repeats: int, workdir: Path) -> None:
    vectors = write_vectors(workdir / f"vectors-{n}.f32", n, dim)
    rng = np.random.default_rng(1)
    queries = [np.asarray(vectors[i]) + rng.standard_normal(dim, dtype=np.float32) * 0.1 for i in rng.integers(0, n, repeats)]
    float(np.asarray(vectors).sum())  # fault every page in: warm
    for q in queries[:2]:
        top_k(vectors, q, k)

    def full_sort(q):
        scores = vectors @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return order, scores[order]

    for q in queries[:3]:
        rows, _ = top_k(vectors, q, k)
        assert rows.tolist() == full_sort(q)[0].tolist(), "top_k disagrees with the full sort"
    dead = rng.random(n) >= 0.05           # 5 % deleted rows not yet compacted
    folder = rng.random(n) < 0.01          # a query restricted to a folder holding 1 % of the photos
    gb = n * dim * 4 / 1e9
    results = median_ms({
        "matvec only (bandwidth floor)": lambda q: vectors @ q,
        "uclip top_k": lambda q: top_k(vectors, q, k),
        "uclip top_k, 5% dead rows masked": lambda q: top_k(vectors, q, k, mask=dead),
        "uclip top_k, folder with 1% of rows": lambda q: top_k(vectors, q, k, mask=folder),
        "numpy full sort (argsort)": full_sort,
    }, queries)
    print(f"\n{n:,} x {dim} float32 ({gb:.2f} GB), k={k}, median of {repeats} warm queries")
    for name, ms in results.items():
        print(f"  {name:<38} {ms:8.1f} ms   ({gb / ms * 1e3:5.1f} GB/s scanned)" if "folder" not in name
              else f"  {name:<38} {ms:8.1f} ms")
    del vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="uclip-bench-search-") as tmp:
        for n in args.sizes:
            bench(n, args.dim, args.k, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()

"""Warm exact search: the float32 pass against the int8 copy (same exact result), one run, same queries.

    python bench/bench_search.py [--sizes 100000 1000000] [--dim 512] [--k 10] [--repeats 15] [--data uniform cone]
                                 [--blocks 64 8192]

The vectors live in a float32 file opened as np.memmap and the int8 copy in the files the index keeps
(blocks written by search.quantize_block, as IndexStore does), all read once before timing (warm page
cache). `uniform`: unit vectors in random directions; `cone`: unit vectors around one common direction
(mean cosine between two of them about 0.5, like CLIP image embeddings), where scores crowd together and
more rows fall inside the int8 bound; `captions`: real sentence embeddings of XM3600 captions (bench/common.py
unit_vectors), queried with held-out captions. `--blocks`: int8 copies in blocks of these widths, each timed
(the first is the one the exact pass uses for the other lines). Printed as well: the bare float32 matrix-vector product (the
bandwidth floor of any float32 scan) and the integer GEMV alone. Methods take turns on each query, so a
busy machine slows them alike; the load average is printed before and after. Every query's results are
compared across the methods (rows and score bits) before timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from uclip_cli.index import exact as search
from uclip_cli.index.exact import top_k, top_k_quantized
from uclip_cli.index.int8_copy import QuantizedRows, check_dtype, quantize_blocks
from uclip_cli.index import int8_kernel as kernels
from uclip_cli.index.int8_kernel import int8_kernel
from uclip_cli.sessions import SessionFactory

CPU = SessionFactory(device="cpu")   # makes the int8 kernel's session

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import cpu_note  # noqa: E402


class Clusters:
    """CLIP-like unit vectors: topics, series of similar photos inside them, a power-law spectrum.

    CLIP image embeddings are not isotropic: the variance along their k-th principal direction falls
    roughly as 1/k, and a photo collection holds topics, and series of near-identical shots within
    them. So a row is normalise(mu + R diag(s) (0.6 t + 0.5 u + 0.25 e)), with mu a common direction
    (norm 0.9), R a random rotation, s_k proportional to k^-1/2 (sum of s_k^2 = 1), t ~ N(0, I) the
    row's topic (one per 20,000 rows, sizes lognormal), u ~ N(0, I) its series (one per 50 rows of the
    topic) and e ~ N(0, I) the photo itself. Measured on 4,000 rows: mean cosine between two rows 0.45,
    median best match 0.97 (CLIP ViT-B/32 on a photo collection: about 0.5 and 0.9+).
    `isotropic=True` drops the spectrum, topics and series instead: rows are normalise(c + 0.75 h) for
    one of n/2,000 centres c (two centres at cosine 0.74), h ~ N(0, I/d) -- the worst case for an
    approximate index, where a row's best match is barely closer than the rest of its cluster.
    Chunk i of the rows is drawn from its own seed, so any chunk can be generated alone.
    """

    def __init__(self, n: int, dim: int, seed: int = 0, *, isotropic: bool = False):
        rng = np.random.default_rng(seed)
        self.dim, self.seed, self.isotropic = dim, seed, isotropic
        mean = rng.standard_normal(dim)
        self.mean = (0.9 * mean / np.linalg.norm(mean)).astype(np.float32)
        if isotropic:
            count = max(16, n // 2000)
            centres = self.mean / 0.9 + rng.standard_normal((count, dim)) * (0.6 / np.sqrt(dim))
            self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        else:
            count = max(4, n // 20_000)
            scales = np.arange(1, dim + 1) ** -0.5
            rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
            self.basis = (rotation * (scales / np.linalg.norm(scales))).astype(np.float32)   # R diag(s)
            self.centres = (0.6 * rng.standard_normal((count, dim))).astype(np.float32)
            self.series = max(1, n // count // 50)
        weights = rng.lognormal(0.0, 1.0, count)
        self.weights = weights / weights.sum()

    def rows(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed])
        topic = rng.choice(len(self.centres), n, p=self.weights)
        if self.isotropic:
            x = self.centres[topic] + rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(0.75 / np.sqrt(self.dim))
        else:
            series = rng.integers(0, self.series, n)
            offsets = np.random.default_rng([self.seed, 1]).standard_normal((len(self.centres), self.series, self.dim),
                                                                            dtype=np.float32) if not hasattr(self, "_offsets") else self._offsets
            self._offsets = offsets
            z = self.centres[topic] + 0.5 * offsets[topic, series] + 0.25 * rng.standard_normal((n, self.dim), dtype=np.float32)
            x = self.mean + z @ self.basis.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(path: Path, n: int, dim: int, data: str, seed: int = 0, chunk: int = 65536) -> np.memmap:
    """n unit vectors of `data` (uniform, cone, clustered) into a float32 file, chunk by chunk."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim).astype(np.float32)
    centre /= np.linalg.norm(centre)
    clusters = Clusters(n, dim, seed, isotropic=data == "isotropic") if data in ("clustered", "isotropic") else None
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            if clusters is not None:
                f.write(clusters.rows(min(chunk, n - start), start // chunk).tobytes())
                continue
            block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
            if data == "cone":
                block = block / np.float32(np.sqrt(dim)) + centre   # cos(v, w) ~ 1 / (1 + 1) = 0.5 on average
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            f.write(block.astype(np.float32).tobytes())
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))


def write_quantized(vectors: np.ndarray, workdir: Path, tag: str, block: int) -> tuple[QuantizedRows, float]:
    n, dim = vectors.shape
    blocks = n // block
    start = time.perf_counter()
    with open(workdir / f"{tag}.q8codes", "wb") as codes_file, open(workdir / f"{tag}.q8rows", "wb") as stats_file, \
            open(workdir / f"{tag}.q8sums", "wb") as checks_file:
        for first in range(0, blocks * block, 8192 // block * block or block):
            codes, stats, checks = quantize_blocks(vectors[first:min(first + (8192 // block * block or block), blocks * block)],
                                                   block)
            codes_file.write(codes)
            stats_file.write(stats)
            checks_file.write(checks)
    seconds = time.perf_counter() - start
    codes = np.memmap(workdir / f"{tag}.q8codes", dtype=np.int8, mode="r", shape=(blocks, dim, block))
    stats = np.memmap(workdir / f"{tag}.q8rows", dtype=np.float32, mode="r", shape=(blocks, len(search.STATS), block))
    checks = np.fromfile(workdir / f"{tag}.q8sums", dtype=check_dtype(dim))   # checked per search, as the index does
    return QuantizedRows(codes, stats, checks), seconds


def median_ms(methods: dict, queries) -> dict[str, float]:
    """Median time per method; methods take turns on each query, so background load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for q in queries:
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(q)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(n: int, dim: int, k: int, repeats: int, data: str, workdir: Path, blocks: list[int]) -> None:
    tag = f"{data}-{n}"
    rng = np.random.default_rng(1)
    if data == "captions":
        vectors = np.memmap(workdir / f"{tag}.f32", dtype=np.float32, mode="w+", shape=(n, dim))
        vectors[:] = common.unit_vectors("captions", n, dim, rng)
        queries = list(common.caption_queries(dim, repeats))
    else:
        vectors = write_vectors(workdir / f"{tag}.f32", n, dim, data)
        queries = [np.asarray(vectors[i]) + rng.standard_normal(dim, dtype=np.float32) * 0.05 for i in rng.integers(0, n, repeats)]
        queries = [q / np.linalg.norm(q) for q in queries]
    copies = {block: write_quantized(vectors, workdir, f"{tag}-{block}", block) for block in blocks}
    quantized, build_s = copies[blocks[0]]
    float(np.asarray(vectors).sum()), int(np.asarray(quantized.codes).sum(dtype=np.int64))  # warm: fault every page in
    kernel = int8_kernel(dim, CPU)
    dead = rng.random(n) >= 0.05           # 5 % deleted rows not yet compacted
    folder = rng.random(n) < 0.01          # a query restricted to a folder holding 1 % of the photos
    candidates = []
    for q in queries:
        for mask in (None, dead, folder):
            info: dict = {}
            want = top_k(vectors, q, k, mask=mask)
            got = top_k_quantized(vectors, quantized, q, k, mask=mask, info=info, sessions=CPU,
                                  path="int8" if kernel else None)   # its counts, whatever the size
            assert want[0].tolist() == got[0].tolist() and np.array_equal(want[1].view(np.uint32), got[1].view(np.uint32)), \
                "the int8 path disagrees with the float32 pass"
            if mask is None:
                candidates.append((info.get("candidates", 0), info.get("rescored", 0)))
    a = np.zeros((1, 1, dim), np.uint8)
    methods = {
        "float32 matvec only (bandwidth floor)": lambda q: vectors @ q,
        "float32 top_k (exact)": lambda q: top_k(vectors, q, k),
        "int8 GEMV alone": (lambda q: kernel.dots(quantized.codes, a)) if kernel else None,
        "int8 top_k_quantized (exact)": lambda q: top_k_quantized(vectors, quantized, q, k, path="int8", sessions=CPU),
        **{f"  the same, int8 copy in blocks of {block:,}": (lambda q, c=copy: top_k_quantized(
            vectors, c, q, k, path="int8", sessions=CPU)) for block, (copy, _) in copies.items() if block != blocks[0]},
        **{f"  int8 GEMV alone, blocks of {block:,}": (lambda q, c=copy: kernel.dots(c.codes, a)) for block, (copy, _) in
           copies.items() if kernel and block != blocks[0]},
        "exact search as uclip runs it (calibrated)": lambda q: top_k_quantized(vectors, quantized, q, k, sessions=CPU),
        "float32 top_k, 5% dead rows masked": lambda q: top_k(vectors, q, k, mask=dead),
        "int8 top_k_quantized, 5% dead rows masked": lambda q: top_k_quantized(vectors, quantized, q, k, mask=dead, sessions=CPU),
        "folder with 1% of rows (float32 rows)": lambda q: top_k_quantized(vectors, quantized, q, k, mask=folder, sessions=CPU),
    }
    results = median_ms({name: fn for name, fn in methods.items() if fn is not None}, queries)
    gb = n * dim * 4 / 1e9
    print(f"\n{n:,} x {dim} {data}, float32 {gb:.2f} GB, int8 copy {n * dim / 1e9:.2f} GB covering {quantized.rows:,} rows "
          f"(built in {build_s:.1f} s), k={k}, median of {repeats} warm queries, load {os.getloadavg()[0]:.1f}")
    measured = search.measure_passes(dim, CPU)
    print("  calibration on this CPU (whole k=10 searches by each pass, 65,536 random rows): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in measured.items()) + f" -> exact search takes the "
          f"{kernels.choose(measured)} pass past {search.CALIBRATE_FROM_ROWS:,} rows")
    print(f"  int8 path: {'kernel exact with query range ' + str(kernel.half_range) if kernel else 'no exact kernel: float32'}; "
          f"candidates per query (bounds reach the k-th best low): median {statistics.median(c for c, _ in candidates):.0f}, "
          f"max {max(c for c, _ in candidates)}; of them re-scored: median {statistics.median(r for _, r in candidates):.0f}, "
          f"max {max(r for _, r in candidates)}")
    for name, ms in results.items():
        print(f"  {name:<44} {ms:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", nargs="+", choices=["uniform", "cone", "clustered", "isotropic", "captions"],
                        default=["uniform", "cone"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[search.QUANT_BLOCK],
                        help="int8 copies in blocks of these many rows (the first answers the other lines)")
    args = parser.parse_args()
    print(f"{cpu_note()}; numpy {np.__version__}; load average {os.getloadavg()} at start")
    with tempfile.TemporaryDirectory(prefix="uclip-bench-search-") as tmp:
        for data in args.data:
            for n in args.sizes:
                bench(n, args.dim, args.k, args.repeats, data, Path(tmp), args.blocks)
                for leftover in Path(tmp).iterdir():
                    leftover.unlink()
    print(f"\nload average {os.getloadavg()} at the end")


if __name__ == "__main__":
    main()

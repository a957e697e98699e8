"""The approximate index against exact search: recall, latency, build, memory, disk, updates, cold CLI.

    python bench/bench_ann.py [--rows 1000000 10000000] [--data clustered] [--queries 100]
                              [--nprobe 8 16 32 64 128] [--overfetch 5 10 20] [--alternative hnsw]
                              [--cli] [--dir DIR] [--keep]

For each size, in one run: a real uclip index (catalogue, row files, int8 copy, FAISS file) is built
in DIR (default $UCLIP_BENCH_CACHE/ann) from synthetic vectors (bench_search.Clusters: CLIP-like
topics, series and power-law spectrum; `--data isotropic` for the worst case), then measured:

- build: vectors written in chunks (never all in RAM), the catalogue's records (fake paths in 100
  folders, written straight into SQLite: a benchmark shortcut; the frozen features file is left
  sparse, search never reads it), then the int8 copy and the FAISS index by the store's own code
  (the writer's open and `set_setting("ann_mode", "on")`), each step in its own process with its
  peak RSS;
- disk bytes per vector of every file;
- exact search (int8 path; at <= 1M also the float32 pass) and the approximate search over the same
  held-out queries (new rows of the same distribution): recall@10 against the exact top 10, median
  latency of the whole `IndexStore.search` (faiss + the exact tail + exact re-scoring of the
  candidates) and of the faiss search alone, for each nprobe and over-fetch factor;
- a folder filter keeping 1 % and 10 % of the rows, and 5 % dead rows (filtered search in faiss);
- an incremental add of 10,000 rows through `IndexStore.add_batch` (searchable at once through the
  exact tail), then folding them into the FAISS file (what happens once TAIL_ROWS rows wait);
- with --cli: the same text query through the whole `uclip query` command (a new process each time,
  the full-size bench bundle of bench/common.py), approximate and --exact;
- with --alternative hnsw (sizes <= 2M): FAISS HNSW32 (flat vectors) built and searched the same way.

Warm means: the files were just written or read, so they sit in the page cache as far as memory
allows (at 10M the 20 GB of float32 rows do not fit in this machine's memory next to the others').
The machine is shared: the load average is printed with every figure. Results go to
bench/out/ann-<rows>-<data>.json as well.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, bench_env, bundle, cpu_note, load_note, uclip_command  # noqa: E402
from bench_search import Clusters  # noqa: E402

DIM = 512
FOLDERS = 100
CHUNK = 65_536
QUERY_TEXT = "dvě kočky spí na červené pohovce"


def _anon_mb() -> float:
    """This process's anonymous resident memory (heap, arrays), MB: what it allocated, not the pages of
    memory-mapped files it touched (those count in the RSS too, and the kernel drops them under pressure)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def in_child(fn, *args):
    """Run fn(*args) in a forked process; (its result, {peak RSS, peak anonymous memory} in MB, seconds)."""
    import threading

    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def target():
        peak = [0.0]
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _anon_mb())

        threading.Thread(target=sample, daemon=True).start()
        start = time.perf_counter()
        result = fn(*args)
        done.set()
        peak[0] = max(peak[0], _anon_mb())
        memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "peak_anon_mb": round(peak[0])}
        queue.put((result, memory, time.perf_counter() - start))

    process = ctx.Process(target=target)
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{fn.__name__} failed in its process")
    return result


def fingerprints(with_cli: bool) -> dict:
    if not with_cli:
        return dict(image_fingerprint="bench", heads_fingerprint="bench", d_clip=DIM, d_search=DIM, bundle_label="bench")
    from uclip_cli.bundle import load_bundle

    b = load_bundle(bundle(), verify=False)
    return dict(image_fingerprint=b.image_fingerprint, heads_fingerprint=b.heads_fingerprint, d_clip=b.dims["clip"],
                d_search=b.dims["shared"], bundle_label=str(b.path))


def folder_of(i: int, n: int) -> str:
    """Rows in FOLDERS folders of consecutive rows (paths then sort as rows do: SQLite appends in order)."""
    return f"/photos/f{i * FOLDERS // n:02d}"


def write_rows(index: Path, n: int, data: str) -> dict:
    """Vectors in chunks, a sparse features file, the catalogue's records and row count."""
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity

    clusters = Clusters(n, DIM, isotropic=data == "isotropic")
    meta = fingerprints(ARGS.cli)
    open_index(index, IndexIdentity(**meta), "create").close()                       # an empty index: schema and meta
    start = time.perf_counter()
    with open(index / "vectors.f32", "wb") as f:
        for first in range(0, n, CHUNK):
            f.write(clusters.rows(min(CHUNK, n - first), first // CHUNK).tobytes())
    os.truncate(index / "features.f32", n * meta["d_clip"] * 4)  # sparse: never read by search
    vectors_s = time.perf_counter() - start
    start = time.perf_counter()
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.execute("PRAGMA synchronous = OFF")
        from uclip_cli.index.catalogue import record_sig

        def rows():
            for i in range(n):
                values = (f"{folder_of(i, n)}/IMG_{i:08d}.jpg", "/photos", 3_000_000 + i, i, f"{i:032x}", "ok", None, i)
                yield (*values, 0.0, record_sig(*values))

        c.executemany("INSERT INTO files(path, root, size, mtime_ns, content_hash, status, error, row, indexed_at, sig) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('rows', ?)", (str(n),))
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('ann_mode', 'off')")   # built in its own step
    return {"vectors_s": vectors_s, "catalogue_s": time.perf_counter() - start}


def build_exact(index: Path) -> dict:
    """The writer's open: the int8 copy of every block (ExactIndex.repair)."""
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity

    start = time.perf_counter()
    with open_index(index, IndexIdentity(**fingerprints(ARGS.cli)), "create") as store:
        return {"int8_s": time.perf_counter() - start, "quantized_rows": store.index("exact").quantized_rows}


def build_ann(index: Path) -> dict:
    from uclip_cli.index import ann_index
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity

    timings: dict = {}
    faiss = ann_index.faiss_module()
    real_train, real_add = faiss.IndexIVFPQ.train, ann_index._add_rows

    def train(index, x):
        start = time.perf_counter()
        real_train(index, x)
        timings["train_s"] = time.perf_counter() - start
        timings["train_rows"] = len(x)

    def add_rows(index, vectors, first, last):
        start = time.perf_counter()
        real_add(index, vectors, first, last)
        timings["add_s"] = time.perf_counter() - start

    faiss.IndexIVFPQ.train, ann_index._add_rows = train, add_rows
    with open_index(index, IndexIdentity(**fingerprints(ARGS.cli)), "create") as store:
        start = time.perf_counter()
        store.set_setting("ann_mode", "on")
        timings["ann_s"] = time.perf_counter() - start
        ann = store.index("ann")
        timings.update(nlist=int(store.meta["ann_nlist"]), nprobe=ann.nprobe(), covered=ann.covered,
                       file_bytes=int(store.meta["ann_bytes"]), head_bytes=int(store.meta["ann_head"]))
    return timings


def disk(index: Path, n: int) -> dict:
    sizes = {p.name: p.stat().st_size for p in index.iterdir() if p.is_file()}
    allocated = {p.name: p.stat().st_blocks * 512 for p in index.iterdir() if p.is_file()}
    return {"bytes_per_vector": {name: round(size / n, 1) for name, size in sizes.items()},
            "allocated_per_vector": {name: round(size / n, 1) for name, size in allocated.items()}}


def timed(fn, repeats=1):
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats


def measure_search(index: Path, n: int, data: str) -> dict:
    from uclip_cli.index import search
    from uclip_cli.index.exact import top_k
    from uclip_cli.index.access import open_index
    from uclip_cli.index.search import search as index_search

    clusters = Clusters(n, DIM, isotropic=data == "isotropic")
    queries = list(clusters.rows(ARGS.queries, 10**9))
    out: dict = {"load_before": load_note()}
    with open_index(index) as store:
        ann = store.searcher("ann")
        index_nprobe = ann.nprobe           # the index's own setting (the curve below changes it)
        vectors = store.vectors()
        exact_ms, truth = [], []
        for q in queries:
            (rows, _), s = timed(lambda: index_search(store, q, 10, exact=True))
            truth.append(set(rows.tolist()))
            exact_ms.append(s * 1e3)
        out["exact_int8_ms"] = statistics.median(exact_ms)
        if n <= 1_000_000:
            out["exact_float32_ms"] = statistics.median(timed(lambda: top_k(vectors, q, 10))[1] * 1e3 for q in queries[:20])
        curve = []
        search.MIN_CANDIDATES = 0                 # over-fetch alone sets the candidates
        for nprobe in ARGS.nprobe:
            for overfetch in ARGS.overfetch:
                search.OVERFETCH = overfetch
                ann.nprobe = nprobe
                recall, whole, alone = [], [], []
                for q, want in zip(queries, truth):
                    info: dict = {}
                    (rows, _), s = timed(lambda: index_search(store, q, 10, info=info))
                    whole.append(s * 1e3)
                    recall.append(len(want & set(rows.tolist())) / 10)
                    _, s = timed(lambda: ann.search(q, 10 * overfetch))
                    alone.append(s * 1e3)
                curve.append({"nprobe": nprobe, "overfetch": overfetch, "recall@10": round(float(np.mean(recall)), 4),
                              "search_ms": round(statistics.median(whole), 2), "faiss_ms": round(statistics.median(alone), 2),
                              "p90_ms": round(float(np.percentile(whole, 90)), 2)})
                print(f"    nprobe {nprobe:4d} over-fetch {overfetch:3d}: recall@10 {curve[-1]['recall@10']:.3f}, "
                      f"search {curve[-1]['search_ms']:6.2f} ms (faiss alone {curve[-1]['faiss_ms']:6.2f}, p90 "
                      f"{curve[-1]['p90_ms']:6.2f}), {load_note()}", flush=True)
        out["curve"] = curve
        # the filters run with uclip's own settings unless told otherwise
        search.OVERFETCH, search.MIN_CANDIDATES = ARGS.default_overfetch or search.OVERFETCH, 0
        ann.nprobe = ARGS.default_nprobe or index_nprobe
        out["filters"] = {}
        rng = np.random.default_rng(3)
        for name, mask in (("folder 1%", _folder_mask(n, 1)), ("folder 10%", _folder_mask(n, 10)),
                           ("5% dead rows", rng.random(n) >= 0.05)):
            recall, whole, exact_ms = [], [], []
            for q in queries[:30]:
                info = {}
                (rows, _), s = timed(lambda: index_search(store, q, 10, mask=mask, info=info))
                (want, _), e = timed(lambda: index_search(store, q, 10, mask=mask, exact=True))
                whole.append(s * 1e3)
                exact_ms.append(e * 1e3)
                recall.append(len(set(want.tolist()) & set(rows.tolist())) / 10)
            out["filters"][name] = {"recall@10": round(float(np.mean(recall)), 4), "search_ms": round(statistics.median(whole), 2),
                                    "exact_ms": round(statistics.median(exact_ms), 2), "index": info.get("index")}
            print(f"    {name}: {out['filters'][name]}", flush=True)
    out["load_after"] = load_note()
    return out


def _folder_mask(n: int, folders: int) -> np.ndarray:
    """The rows of the first `folders` folders (as IndexStore.search_mask gives them for one folder)."""
    return np.arange(n) * FOLDERS // n < folders


def incremental(index: Path, n: int, data: str) -> dict:
    """10,000 rows through add_batch (searchable at once), then folded into the FAISS file."""
    from uclip_cli.index import ann_index
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.search import search as index_search
    from uclip_cli.index.records import Embedded
    from uclip_cli.walk import FileEntry

    clusters = Clusters(n, DIM, isotropic=data == "isotropic")
    new = clusters.rows(10_000, 10**9 + 1)
    entries = [Embedded(FileEntry(path=Path(f"/photos/new/IMG_{i:05d}.jpg"), root=Path("/photos"), size=1, mtime_ns=i),
                        f"new{i:029d}") for i in range(len(new))]
    out = {}
    with open_index(index, IndexIdentity(**fingerprints(ARGS.cli)), "create") as store:
        start = time.perf_counter()
        store.add_batch(entries, np.zeros((len(new), store.d_clip), np.float32) + np.float32(1 / np.sqrt(store.d_clip)), new)
        out["add_10k_s"] = time.perf_counter() - start
        assert store.index("ann").covered == n, "the add should leave the new rows in the exact tail"
    with open_index(index) as reader:
        index_search(reader, new[0], 1)                           # first search: kernel and files opened
        info: dict = {}
        (rows, _), s = timed(lambda: index_search(reader, new[1234], 1, info=info))
        out["new_row_found"] = rows.tolist() == [n + 1234] and info.get("index") == "ann"
        times = [timed(lambda: index_search(reader, q, 10))[1] * 1e3 for q in clusters.rows(20, 10**9 + 2)]
        out["search_with_10k_tail_ms"] = round(statistics.median(times), 2)
    real_extend = ann_index.AnnIndex._extend

    def extend(self, vectors):
        start = time.perf_counter()
        changes = real_extend(self, vectors)
        out["fold_10k_s"] = time.perf_counter() - start     # read the file, add the rows, write, fsync, digests
        return changes

    ann_index.AnnIndex._extend = extend
    with open_index(index, IndexIdentity(**fingerprints(ARGS.cli)), "create") as store:
        ann_index.TAIL_ROWS = 0
        store.set_setting("ann_mode", "on")        # the writer's repair: add() folds the tail into a new file
        out["covered_after_fold"] = store.index("ann").covered
    return out


def cli_cold(index: Path) -> dict:
    env = bench_env(UCLIP_TIMINGS="1")
    out = {}
    for name, extra in (("approximate", []), ("exact", ["--exact"])):
        walls = []
        for _ in range(ARGS.cli_runs):
            start = time.perf_counter()
            done = subprocess.run([*uclip_command(), "query", QUERY_TEXT, "--index", str(index), "--bundle", str(bundle()),
                                   "--format", "json", *extra], env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - start)
            assert done.returncode == 0, done.stderr
        out[name] = {"median_s": round(statistics.median(walls), 3), "runs": [round(w, 3) for w in walls],
                     "timings": next((json.loads(line.split(" ", 2)[2]) for line in done.stderr.splitlines()
                                      if line.startswith("uclip timings")), {})}
        print(f"    cold `uclip query` {name}: {out[name]['median_s']:.3f} s, {load_note()}", flush=True)
    return out


def hnsw(index: Path, n: int, data: str) -> dict:
    import faiss

    from uclip_cli.index.access import open_index
    from uclip_cli.index.search import search as index_search

    clusters = Clusters(n, DIM, isotropic=data == "isotropic")
    queries = clusters.rows(ARGS.queries, 10**9)
    with open_index(index) as store:
        vectors = store.vectors()
        truth = [set(index_search(store, q, 10, exact=True)[0].tolist()) for q in queries]
        graph = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        for first in range(0, n, CHUNK):
            graph.add(np.ascontiguousarray(vectors[first:first + CHUNK]))
        build_s = time.perf_counter() - start
        path = index / "hnsw.bench"
        faiss.write_index(graph, str(path))
        out = {"build_s": build_s, "bytes_per_vector": path.stat().st_size / n, "curve": []}
        path.unlink()
        for ef in (16, 32, 64, 128):
            graph.hnsw.efSearch = ef
            recall, ms = [], []
            for q, want in zip(queries, truth):
                (scores, rows), s = timed(lambda: graph.search(q[None], 10))
                ms.append(s * 1e3)
                recall.append(len(want & set(rows[0].tolist())) / 10)
            out["curve"].append({"efSearch": ef, "recall@10": round(float(np.mean(recall)), 4), "faiss_ms": round(statistics.median(ms), 2)})
            print(f"    HNSW32 efSearch {ef}: {out['curve'][-1]}, {load_note()}", flush=True)
    return out


def run(n: int, data: str) -> dict:
    index = Path(ARGS.dir) / f"index-{n}-{data}"
    free = shutil.disk_usage(Path(ARGS.dir).anchor if not Path(ARGS.dir).exists() else ARGS.dir).free
    need = n * (DIM * 4 + DIM + 200)
    if free < need * 1.2:
        raise SystemExit(f"{ARGS.dir}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed for {n:,} rows")
    shutil.rmtree(index, ignore_errors=True)
    index.mkdir(parents=True)
    result: dict = {"rows": n, "data": data, "cpu": cpu_note(), "load_start": load_note()}
    print(f"\n{n:,} x {DIM} {data}: {cpu_note()}; {load_note()}", flush=True)
    steps = {}
    for name, fn in (("rows", write_rows), ("int8 copy", build_exact), ("ann", build_ann)):
        args = (index, n, data) if fn is write_rows else (index,)
        value, memory, seconds = in_child(fn, *args)
        steps[name] = {**value, **memory, "seconds": round(seconds, 1), "load": load_note()}
        print(f"  built {name}: {steps[name]}", flush=True)
    result["build"] = steps
    result["disk"] = disk(index, n)
    print(f"  disk bytes per vector: {result['disk']['bytes_per_vector']}", flush=True)
    result["search"], memory, _ = in_child(measure_search, index, n, data)
    result["search"].update(memory)
    if ARGS.alternative == "hnsw" and n <= 2_000_000:
        result["hnsw"], memory, _ = in_child(hnsw, index, n, data)
        result["hnsw"].update(memory)
    if ARGS.cli:
        result["cli"] = cli_cold(index)
    result["incremental"], memory, _ = in_child(incremental, index, n, data)
    result["incremental"].update(memory)
    print(f"  incremental: {result['incremental']}", flush=True)
    result["load_end"] = load_note()
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ann-{n}-{data}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if not ARGS.keep:
        shutil.rmtree(index, ignore_errors=True)
    return result


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--data", nargs="+", choices=["clustered", "isotropic"], default=["clustered"])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--overfetch", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--default-nprobe", type=int, default=None, help="for the filters (default: the index's own)")
    parser.add_argument("--default-overfetch", type=int, default=None, help="for the filters (default: uclip's)")
    parser.add_argument("--alternative", choices=["hnsw", "none"], default="none")
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--dir", default=str(CACHE / "ann"))
    parser.add_argument("--keep", action="store_true", help="keep the indexes (tens of GB at 10M)")
    ARGS = parser.parse_args()
    for data in ARGS.data:
        for n in ARGS.rows:
            run(n, data)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()

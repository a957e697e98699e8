"""`uclip serve` through HTTP: warm query latency at 100,000 vectors with the full-size text tower, and the
first page of 50 thumbnails from a cold thumbnail cache of 12 MP JPEGs.

    python bench/bench_serve.py                          # fp32 text tower, 200 queries / 1 client, 8 x 40 / 8 clients
    python bench/bench_serve.py --variants fp32,int8 --queries 100 --skip-thumbnails

Server: the installed `uclip serve` in a process of its own, on the cached full-size bundle (random weights of
paraphrase-multilingual-MiniLM-L12-v2's shape, the real XLM-R tokenizer, trained-shaped heads) and synthetic
indexes of 100,000 vectors (bench/common.py builds them once): random unit vectors, the exact int8 pass's worst
case, and caption embeddings with the structure of real embeddings (`--index`; common.unit_vectors says what
they are). Default threads: all cores. Each index is also asked "more like this" for indexed photos
(/api/similar/{id}): no encoding, and a query from the data's own distribution.
Clients: Python threads, each with one keep-alive HTTP/1.1 connection (http.client), as a browser tab keeps
one; a latency runs from sending the request to the parsed JSON answer (top 50, with ids, paths, scores).
Queries are distinct XM3600 captions in 36 languages, so every one is tokenised and encoded; the server
keeps vectors of texts it has seen (the page asks the same text again for the next page of results), so a
repeated text is timed apart ("repeated"). Each run starts with 20 warm-up queries that are not counted.
The queries' token counts (real XLM-R vocabulary: the text tower's time grows with them) are printed with
each table, and the CPU model with the vector extensions that choose onnxruntime's kernels.

Thumbnails: `uclip index` of bench_index.py's 60 generated 12 MP JPEGs (4000x3000, quality 90) into an
index of their own; the thumbnail cache is deleted, the first page (50 results) is fetched, then its 50
/thumb URLs over 6 connections (a browser's limit per host); "all loaded" is when the last one arrived.
Meanwhile one more client sends a query every 100 ms: its latencies show whether thumbnails stall queries.

The machine is shared: the load average is printed with every figure.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import common
import numpy as np

ROWS = 100_000
KIND_NOTES = {"random": "random unit vectors", "captions": "caption embeddings (common.unit_vectors: real sentence "
              "embeddings of XM3600 captions, a stand-in for image vectors)"}
BROWSER_CONNECTIONS = 6


# ------------------------------------------------------------------------------------------ server

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(bundle: Path, index: Path, env: dict[str, str], *extra: str):
    """A `uclip serve --port 0` process; yields (host, port, pid)."""
    command = common.uclip_command() + ["serve", "--port", "0", "--bundle", str(bundle), "--index", str(index), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = process.stdout.readline().decode()
        found = re.search(r"http://([\d.]+):(\d+)/", line)
        if not found:
            sys.exit(f"uclip serve did not start: {line!r}\n{process.stderr.read().decode()}")
        common.say(f"server ready in {time.perf_counter() - started:.1f} s (sessions created and run once)")
        yield found.group(1), int(found.group(2)), process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


class Client:
    """One keep-alive connection, as a browser tab keeps one."""

    def __init__(self, host: str, port: int):
        self.connection = http.client.HTTPConnection(host, port, timeout=60)
        self.host = f"{host}:{port}"

    def get(self, path: str) -> tuple[float, bytes]:
        start = time.perf_counter()
        self.connection.request("GET", path, headers={"Host": self.host})
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path[:80]}: {response.status} {body[:200]!r}")
        return time.perf_counter() - start, body

    def search(self, text: str, top: int = 50) -> tuple[float, dict]:
        seconds, body = self.get(f"/api/search?q={quote(text)}&top={top}")
        answer = json.loads(body)
        assert answer["results"], answer
        return seconds, answer


def captions(count: int) -> list[str]:
    """Distinct captions in many languages (XM3600 when it is there; the fallback sentences otherwise)."""
    from tiny_models import training_sentences

    seen: dict[str, None] = {}
    for sentence in training_sentences(per_language=max(10, count // 20 + 5)):
        seen.setdefault(sentence, None)
    texts = list(seen)
    step = max(1, len(texts) // count)
    picked = texts[::step][:count]
    while len(picked) < count:                       # a short fallback list: number the repeats
        picked.append(f"{texts[len(picked) % len(texts)]} {len(picked)}")
    return picked


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]   # noqa: E731
    return {"n": len(ms), "p50": statistics.median(ms), "p90": pick(0.90), "p99": pick(0.99), "max": ms[-1]}


def run_clients(host: str, port: int, texts: list[str], clients: int) -> tuple[list[float], list[dict], float]:
    """Each client sends its share of `texts` one after the other; all clients at once."""
    shares = [texts[i::clients] for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    timings: list[list[dict]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        client = Client(host, port)
        barrier.wait()
        for text in shares[i]:
            seconds, answer = client.search(text)
            latencies[i].append(seconds)
            timings[i].append(answer["timings_ms"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [s for part in latencies for s in part], [t for part in timings for t in part], wall


def latency(variant: str, queries: int, clients_list: list[int], kind: str, rows: int) -> None:
    bundle = common.bundle(None if variant == "fp32" else variant)
    index = common.synthetic_index(bundle, rows, kind=kind)
    texts = captions(20 + queries * (1 + len(clients_list)))
    counts = common.token_counts(bundle, texts[20:])
    with server(bundle, index, common.bench_env()) as (host, port, pid):
        warm = Client(host, port)
        for text in texts[:20]:
            warm.search(text)
        used = 20
        print(f"\n{variant} text tower, {rows:,} {KIND_NOTES[kind]}, top 50 ({common.load_note()})")
        print(f"new texts: {common.tokens_note(counts)}")
        if variant == "int8-beside":
            chosen = json.loads((Path(common.bench_env()["XDG_CACHE_HOME"]) / "uclip" / "text-precision.json").read_text())
            print(f"the server's text tower precision (text-precision.json: measured at the first start on this machine, then remembered): {chosen}")
        print("| clients | queries | p50 ms | p90 ms | p99 ms | max ms | queries/s | server CPU ms/query | "
              "server encode p50 ms | server search p50 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for clients in clients_list:
            batch = texts[used:used + queries]
            used += queries
            cpu_before = cpu_seconds(pid)
            seconds, timings, wall = run_clients(host, port, batch, clients)
            cpu = 1000 * (cpu_seconds(pid) - cpu_before) / len(batch)
            p = percentiles(seconds)
            encode = statistics.median(t["encode"] for t in timings)
            search = statistics.median(t["search"] for t in timings)
            print(f"| {clients} | {p['n']} | **{p['p50']:.1f}** | {p['p90']:.1f} | {p['p99']:.1f} | {p['max']:.1f} | "
                  f"{len(seconds) / wall:.1f} | {cpu:.1f} | {encode:.1f} | {search:.1f} |   ({common.load_note()})")
        similar_photos(host, port, pid, queries, rows)
        again = Client(host, port)      # a new connection: the warm one may have idled past keep-alive
        cpu_before = cpu_seconds(pid)
        repeated = [again.search(texts[20])[0] for _ in range(50)]
        cpu = 1000 * (cpu_seconds(pid) - cpu_before) / 50
        p = percentiles(repeated)
        print(f"| 1, one text again (vector cached) | {p['n']} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | "
              f"{p['max']:.1f} | | {cpu:.1f} | | |   ({common.load_note()})")


def similar_photos(host: str, port: int, pid: int, count: int, rows: int) -> None:
    """"More like this" for `count` indexed photos (/api/similar/{id}): no text to encode, and the query is a
    row of the index itself, so it has the data's own distribution (the text tower's vectors come from random
    weights: on the captions index they are not captions' neighbours)."""
    client = Client(host, port)
    picked = np.random.default_rng(1).choice(rows, count, replace=False)
    cpu_before = cpu_seconds(pid)
    seconds, searches = [], []
    for row in picked.tolist():
        took, body = client.get(f"/api/similar/{row:032x}?top=50")
        seconds.append(took)
        searches.append(json.loads(body)["timings_ms"]["search"])
    cpu = 1000 * (cpu_seconds(pid) - cpu_before) / count
    p = percentiles(seconds)
    print(f"| 1, more like an indexed photo | {p['n']} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | {p['max']:.1f} | "
          f"| {cpu:.1f} | 0 | {statistics.median(searches):.1f} |   ({common.load_note()})")


# ------------------------------------------------------------------------------------------ thumbnails

def thumbnails(bundle_variant: str) -> None:
    import bench_index

    bundle = common.bundle(None if bundle_variant == "fp32" else bundle_variant)
    photos = bench_index.image_folder("12mp")
    index = common.CACHE / f"index-12mp-photos-{bundle_variant}"
    env = common.bench_env()
    if not (index / common.MARKER).is_file():
        with common.building(f"index of the {len(bench_index.jpegs(photos))} 12 MP photos at {index}"):
            shutil.rmtree(index, ignore_errors=True)
            subprocess.run(common.uclip_command() + ["index", str(photos), "--bundle", str(bundle), "--index", str(index),
                                                     "--no-progress"], env=env, check=True, capture_output=True)
            (index / common.MARKER).write_text("done\n", encoding="utf-8")
    cache = Path(env["XDG_CACHE_HOME"]) / "uclip" / "thumbnails"
    with server(bundle, index, env) as (host, port, _):
        page_client = Client(host, port)
        page_client.search("warm up")
        for run in range(3):
            shutil.rmtree(cache, ignore_errors=True)
            _, page = page_client.search(f"fotky z dovolené {run}", top=50)
            urls = [r["thumb"] for r in page["results"]]
            assert len(urls) == 50, len(urls)
            stop = threading.Event()
            side: list[float] = []

            def side_queries() -> None:
                client = Client(host, port)
                i = 0
                while not stop.is_set():
                    side.append(client.search(f"kočka na okně {run} {i}")[0])
                    i += 1
                    time.sleep(0.1)

            watcher = threading.Thread(target=side_queries)
            watcher.start()
            start = time.perf_counter()
            arrived: list[float] = []
            lock = threading.Lock()

            def fetch(part: list[str]) -> None:
                client = Client(host, port)
                for url in part:
                    client.get(url)
                    with lock:
                        arrived.append(time.perf_counter() - start)

            workers = [threading.Thread(target=fetch, args=(urls[i::BROWSER_CONNECTIONS],)) for i in range(BROWSER_CONNECTIONS)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            stop.set()
            watcher.join()
            made = len(list(cache.glob("*/*-256.jpg")))
            q = percentiles(side)
            print(f"thumbnails run {run + 1}: 50 from a cold cache of 12 MP JPEGs, all loaded in **{max(arrived):.2f} s** "
                  f"(first {min(arrived):.2f} s, {made} made); queries meanwhile: p50 {q['p50']:.0f} ms, max {q['max']:.0f} ms "
                  f"({q['n']} queries)   ({common.load_note()})")
        start = time.perf_counter()
        page_client = Client(host, port)
        for url in urls:
            page_client.get(url)
        print(f"the same 50 again (disk cache, one connection): {time.perf_counter() - start:.3f} s   ({common.load_note()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="fp32", help="fp32, int8, int8-beside (text towers; int8-beside: both, "
                        "the server choosing by measurement), default (the default model as a first use assembles "
                        "it: common.bundle): comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="queries per client setting")
    parser.add_argument("--clients", default="1,8", help="concurrent clients: comma-separated")
    parser.add_argument("--index", default="random,captions", help="kinds of synthetic index (common.unit_vectors): "
                        "random (isotropic unit vectors, the int8 pass's worst case), captions (real sentence "
                        "embeddings): comma-separated")
    parser.add_argument("--rows", type=int, default=ROWS, help="vectors in each synthetic index")
    parser.add_argument("--skip-thumbnails", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    print(f"{common.cpu_note()}; {common.load_note()} at start")
    if not args.skip_latency:
        for kind in args.index.split(","):
            for variant in args.variants.split(","):
                latency(variant, args.queries, [int(c) for c in args.clients.split(",")], kind, args.rows)
    if not args.skip_thumbnails:
        print()
        thumbnails(args.variants.split(",")[0])


if __name__ == "__main__":
    main()

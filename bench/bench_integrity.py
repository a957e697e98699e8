"""What the row checksums cost on the query path (issue 19, item 1), one run, same queries.

    python bench/bench_integrity.py [--sizes 1000 10000 32768 100000] [--dim 512] [--repeats 9]

For each size, an index of random unit vectors is written by IndexStore (so with its checksums, and with
its int8 copy from 8,192 rows on) and searched through `index.search.search`, the library call `uclip query`
and `uclip serve` make, with the caller's CPU session factory. Three readers take turns on each query:

    unchecked   the checksum files moved aside (an index written before checksums): no check at all
    one-shot    a reader as `uclip query` opens it: each search checks the rows nothing proves (every row
                below the int8 threshold, the rows past the int8 copy above it, where the int8 pass answers)
    verified    a reader after `warm()`, as `uclip serve` holds it: every row checked once, searches check
                only their answer's rows

Printed: the median milliseconds per search of each, the cost of one full verification (what `warm()`
adds to a server's start), and per-row CRC-32 throughput. The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_note, load_note, random_unit_index
from uclip_cli.index.access import open_index
from uclip_cli.index.rowfiles import row_crcs
from uclip_cli.index.search import search
from uclip_cli.sessions import SessionFactory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 32768, 100000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(cpu_note())
    print(load_note())
    sessions = SessionFactory(device="cpu")
    rng = np.random.default_rng(0)
    v = rng.standard_normal((8192, args.dim), dtype=np.float32)
    start = time.perf_counter()
    row_crcs(v)
    print(f"CRC-32 of {args.dim}-d float32 rows: {(time.perf_counter() - start) / len(v) * 1e6:.2f} us a row")
    print(f"{'rows':>8} {'unchecked ms':>13} {'one-shot ms':>12} {'verified ms':>12} {'warm() s':>9}  rows checked per one-shot search")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            checked, unchecked = Path(tmp) / f"c{rows}", Path(tmp) / f"u{rows}"
            random_unit_index(checked, rows, args.dim, rng)
            shutil.copytree(checked, unchecked)
            for crc in unchecked.glob("*.crc"):
                crc.unlink()
            readers = {name: open_index(path, sessions=sessions) for name, path in
                       (("unchecked", unchecked), ("one-shot", checked), ("verified", checked))}
            started = time.perf_counter()
            readers["verified"].warm()
            warm = time.perf_counter() - started
            queries = rng.standard_normal((args.repeats + 1, args.dim), dtype=np.float32)
            times: dict[str, list[float]] = {name: [] for name in readers}
            for i, q in enumerate(queries):
                answers = []
                for name, reader in readers.items():
                    started = time.perf_counter()
                    answers.append(search(reader, q, 10)[0].tolist())
                    if i:                                   # the first round opens files and kernels
                        times[name].append(time.perf_counter() - started)
                assert answers[0] == answers[1] == answers[2], "the readers disagree"
            proven = readers["one-shot"].proven_rows()
            print(f"{rows:>8} " + " ".join(f"{statistics.median(times[n]) * 1e3:>12.2f}" for n in readers)
                  + f" {warm:>9.3f}  {rows - proven:,}")
            for reader in readers.values():
                reader.close()
    print(load_note())


if __name__ == "__main__":
    main()

"""What photo filters cost on the query path (issue 23, item 2): the row mask a filtered search adds.

    python bench/bench_filters.py [--rows 100000] [--dim 64] [--repeats 7]

An index of `--rows` random unit vectors is written by IndexStore with synthetic metadata on every record
(capture times over 10 years, 8 cameras, GPS on 60 % of photos around 5 cities, half portrait), then a
reader as `uclip query` opens it. For each filter: the median milliseconds of Catalogue.filter_mask (the
one SQL query, plus exact distances for --near), the share of photos it keeps, and the median of a whole
filtered search (photo_search.search_rows, top 20) beside the unfiltered one, and a query of filters alone
(every passing photo ordered by capture time). The vector dimension only
moves the search column, not the mask's cost. The load average is printed before and after (the machine
may be shared).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_note, load_note, random_unit_index
from uclip_cli.filters import read_filters
from uclip_cli.index.access import open_index
from uclip_cli.index.records import PhotoMeta
from uclip_cli.photo_search import by_date, search_rows
from uclip_cli.sessions import SessionFactory

CAMERAS = [("Google", "Pixel 7"), ("Google", "Pixel 4a"), ("Apple", "iPhone 12"), ("Apple", "iPhone 8"),
           ("Canon", "Canon EOS R5"), ("NIKON CORPORATION", "NIKON D750"), ("SONY", "ILCE-7M3"), ("samsung", "SM-G991B")]
CITIES = [(45.81, 15.98), (43.51, 16.44), (50.08, 14.42), (48.21, 16.37), (-33.87, 151.21)]
FILTERS = {
    "--after 2019-06 --before 2019-09": [("after", "2019-06", "a"), ("before", "2019-09", "b")],
    "--camera pixel": [("camera", "pixel", "c")],
    "--near 45.81,15.98 --within 20km": [("near", "45.81,15.98", "n"), ("within", "20km", "w")],
    "--has-gps": [("gps", "1", "g")],
    "--portrait": [("shape", "portrait", "p")],
    "all of camera+after+gps+landscape": [("camera", "iphone", "c"), ("after", "2020", "a"), ("gps", "1", "g"),
                                          ("shape", "landscape", "l")],
}


def synthetic_meta(i: int, rng: np.random.Generator) -> PhotoMeta:
    seconds = 1.45e9 + rng.uniform(0, 3.15e8)
    make, model = CAMERAS[int(rng.integers(len(CAMERAS)))]
    lat = lon = None
    if rng.random() < 0.6:
        lat, lon = CITIES[int(rng.integers(len(CITIES)))]
        lat, lon = lat + rng.normal(0, 0.3), lon + rng.normal(0, 0.3)
    portrait = rng.random() < 0.5
    return PhotoMeta(taken=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), taken_source="exif", make=make,
                     model=model, width=3000 if portrait else 4000, height=4000 if portrait else 3000, lat=lat, lon=lon)


def median_ms(fn, repeats: int) -> float:
    fn()   # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(cpu_note())
    print(load_note())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        random_unit_index(Path(tmp) / "index", args.rows, args.dim, rng, synthetic_meta)
        print(f"built {args.rows} rows with metadata in {time.perf_counter() - started:.1f} s")
        with open_index(Path(tmp) / "index", sessions=SessionFactory(device="cpu", threads=1)) as store:
            query = rng.standard_normal(args.dim).astype(np.float32)
            query /= np.linalg.norm(query)
            plain = median_ms(lambda: search_rows(store, query, 20), args.repeats)
            print(f"{'filter':<36} {'mask ms':>8} {'kept':>7} {'search ms':>10} (unfiltered search: {plain:.1f} ms)")
            for name, given in FILTERS.items():
                photo_filter = read_filters(given)
                mask_ms = median_ms(lambda: store.details.filter_mask(photo_filter), args.repeats)
                kept = store.details.filter_mask(photo_filter).mean()
                search_ms = median_ms(lambda: search_rows(store, query, 20, photo_filter=photo_filter), args.repeats)
                print(f"{name:<36} {mask_ms:8.1f} {kept:7.1%} {search_ms:10.1f}")
            photo_filter = read_filters([("gps", "1", "g")])

            def alone():   # `uclip query has:gps`: every photo that passes, newest first (no vector)
                rows = np.flatnonzero(store.details.filter_mask(photo_filter))
                return by_date(store, rows, np.zeros(len(rows), np.float32), newest_first=True)[0][:20]

            print(f"filters alone, has:gps by date: {median_ms(alone, args.repeats):.1f} ms")
    print(load_note())


if __name__ == "__main__":
    main()

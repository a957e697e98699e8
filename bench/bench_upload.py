"""`uclip serve`'s search by an uploaded photo (POST /api/similar-upload) through HTTP: upload -> results latency.

    python bench/bench_upload.py [--repeats 10]

Server: bench_serve.py's (the installed `uclip serve` in a process of its own, the cached full-size fp32 bundle:
ViT-B/32 image tower at 224 px with random weights, trained-shaped heads, and a synthetic index of 100,000 random
unit vectors). Client: one keep-alive HTTP/1.1 connection (http.client), as a browser tab keeps one; a latency
runs from sending the request (headers + whole body) to the parsed JSON answer (top 50). The server's own split
comes from the answer's timings_ms: "encode" is decode (JPEGs at reduced DCT scale) + preprocess + image tower,
"search" the exact search over 100,000 rows. Photos: photo_like pictures (tests/image_fixtures.py) of 12 MP
(4000x3000) as JPEG quality 90 and as PNG, and 1 MP (1280x960) JPEG; each is first sent once, not counted.
For scale, /api/similar/{id} of an indexed photo (no decode, no encode) is timed too.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import time

import common
from bench_serve import ROWS, server


def post(connection: http.client.HTTPConnection, host: str, data: bytes, kind: str) -> tuple[float, dict]:
    start = time.perf_counter()
    connection.request("POST", "/api/similar-upload?top=50", body=data,
                       headers={"Host": host, "Content-Type": kind, "Content-Length": str(len(data))})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST: {response.status} {body[:200]!r}")
    answer = json.loads(body)
    return time.perf_counter() - start, answer


def photo(width: int, height: int, fmt: str) -> bytes:
    from image_fixtures import photo_like

    out = io.BytesIO()
    photo_like(width, height, seed=7).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundle = common.bundle()
    index = common.synthetic_index(bundle, ROWS)
    photos = [("12 MP JPEG", photo(4000, 3000, "JPEG"), "image/jpeg"),
              ("12 MP PNG", photo(4000, 3000, "PNG"), "image/png"),
              ("1 MP JPEG", photo(1280, 960, "JPEG"), "image/jpeg")]
    common.say(common.cpu_note())
    with server(bundle, index, common.bench_env()) as (host, port, _):
        connection = http.client.HTTPConnection(host, port, timeout=120)
        address = f"{host}:{port}"
        print("| photo | bytes | upload -> results, median (min-max) | server: encode | server: search |  load |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, data, kind in photos:
            post(connection, address, data, kind)                     # first: not counted
            runs = [post(connection, address, data, kind) for _ in range(args.repeats)]
            seconds = [s for s, _ in runs]
            encode = statistics.median(a["timings_ms"]["encode"] for _, a in runs)
            search = statistics.median(a["timings_ms"]["search"] for _, a in runs)
            print(f"| {name} | {len(data) / 1e6:.1f} MB | {1000 * statistics.median(seconds):.0f} ms "
                  f"({1000 * min(seconds):.0f}-{1000 * max(seconds):.0f}) | {encode:.0f} ms | {search:.0f} ms "
                  f"| {common.load_note()} |", flush=True)
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            connection.request("GET", f"/api/similar/{i:032x}?top=50", headers={"Host": address})
            response = connection.getresponse()
            json.loads(response.read())
            assert response.status == 200
            times.append(time.perf_counter() - start)
        print(f"| /api/similar/{{id}} (indexed, for scale) | - | {1000 * statistics.median(times):.0f} ms | 0 | - "
              f"| {common.load_note()} |")


if __name__ == "__main__":
    main()

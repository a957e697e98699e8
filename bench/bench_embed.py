"""`uclip embed` on a local Ray against `uclip index`: same photos, same threads, alternating, whole processes.

    python bench/bench_embed.py --count 300 --repeats 3 --threads 2 --shard-size 32

For each repeat, in one loop (so both meet the same machine load):
  index    `uclip index DIR --threads T --workers T` on a fresh index: wall seconds of the whole process
  embed    `uclip embed DIR --threads T --shard-size S` into a fresh folder on a Ray it starts itself
           (ray.init() on this machine): wall seconds of the whole process, and the same less Ray's start-up
           (reported by the summary), which a cluster pays once, not per job
  import   `uclip index --import OUT` of those shards: wall seconds (no image is decoded)
Overhead = embed / index - 1: per repeat (paired), of the medians, and of the best runs (on a shared machine
another process only ever slows a run down; compare the paired figures and the load to see whether one did). Images are bench_index.py's generated 640x480
JPEGs (photo-like, quality 90); the bundle is the full-size fp32 ViT-B/32 of bench/common.py.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time

import common
from bench_index import image_folder, jpegs


def timed(command: list[str], what: str) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run(command, env=common.bench_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return done.stdout, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

    bundle = common.bundle()
    folder = image_folder("640x480", args.count)
    n = len(jpegs(folder))
    uclip = common.uclip_command()
    work = common.CACHE / "tmp-embed"
    print(f"{n} JPEGs 640x480 in {folder}; bundle {bundle} (fp32 ViT-B/32); threads {args.threads}; "
          f"shard size {args.shard_size}")
    print(f"{common.cpu_note()}; {common.load_note()} at start; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    threads = ["--threads", str(args.threads)]
    # One small run of each first: optimised-graph cache, checksum cache, Ray's first start (not timed).
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    one = work / "one"
    one.mkdir()
    shutil.copy(jpegs(folder)[0], one)
    timed(uclip + ["index", str(one), "--index", str(work / "i0"), "--bundle", str(bundle), "--no-progress"], "warm-up")
    timed(uclip + ["embed", str(one), "--out", str(work / "e0"), "--bundle", str(bundle), "--no-progress"], "warm-up")

    index_walls, embed_walls, steady_walls, import_walls = [], [], [], []
    for r in range(args.repeats):
        shutil.rmtree(work / "index", ignore_errors=True)
        out, wall = timed(uclip + ["index", str(folder), "--index", str(work / "index"), "--bundle", str(bundle),
                                   "--no-progress", "--workers", str(args.threads), *threads], "uclip index")
        index_walls.append(wall)
        print(f"  index   {wall:6.1f} s  {n / wall:5.1f} images/s   [{common.load_note()}]", flush=True)

        shutil.rmtree(work / "shards", ignore_errors=True)
        out, wall = timed(uclip + ["embed", str(folder), "--out", str(work / "shards"), "--bundle", str(bundle),
                                   "--no-progress", "--shard-size", str(args.shard_size), *threads], "uclip embed")
        ray_start = float(re.search(r"Ray start ([\d.]+) s", out).group(1))
        embed_walls.append(wall)
        steady_walls.append(wall - ray_start)
        print(f"  embed   {wall:6.1f} s  {n / wall:5.1f} images/s  (Ray start {ray_start:.1f} s; without it "
              f"{n / (wall - ray_start):5.1f} images/s)   [{common.load_note()}]", flush=True)

        print(f"  paired  embed / index {wall / index_walls[-1] - 1:+.0%}, without Ray's start-up "
              f"{steady_walls[-1] / index_walls[-1] - 1:+.0%}", flush=True)

        shutil.rmtree(work / "imported", ignore_errors=True)
        out, wall = timed(uclip + ["index", "--import", str(work / "shards"), "--index", str(work / "imported"),
                                   "--bundle", str(bundle), "--no-progress"], "uclip index --import")
        import_walls.append(wall)
        print(f"  import  {wall:6.1f} s  {n / wall:5.1f} images/s   [{common.load_note()}]", flush=True)

    index_wall, embed_wall, steady = (statistics.median(x) for x in (index_walls, embed_walls, steady_walls))
    print(f"  => median of {args.repeats}: index {index_wall:.1f} s, embed {embed_wall:.1f} s "
          f"(overhead {embed_wall / index_wall - 1:+.0%}), embed without Ray's start-up {steady:.1f} s "
          f"(overhead {steady / index_wall - 1:+.0%}), import {statistics.median(import_walls):.1f} s")
    # Another process on the machine only ever slows a run down: the best run of each is the least disturbed.
    print(f"  => best of {args.repeats}: index {min(index_walls):.1f} s, embed {min(embed_walls):.1f} s "
          f"(overhead {min(embed_walls) / min(index_walls) - 1:+.0%}), embed without Ray's start-up "
          f"{min(steady_walls):.1f} s (overhead {min(steady_walls) / min(index_walls) - 1:+.0%}); {common.load_note()}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Indexing speed, whole process: `uclip index` against a plain PyTorch + transformers loop, same images, one run.

    python bench/bench_index.py --stages --repeats 3         # 60 x 12 MP and 200 x 640x480 JPEGs
    python bench/bench_index.py --sets 12mp --repeats 2 -- --batch-size 16 --workers 1

Images are generated once (photo-like, JPEG quality 90) and cached with the full-size ViT-B/32 bundle
under $UCLIP_BENCH_CACHE (see bench/common.py). For each set and repeat:

  uclip     `uclip index DIR` in a new process on a fresh index: images / wall-clock second of the
            whole process (interpreter, imports, bundle, session, walk, decode, encode, commits).
  baseline  a new process running the loop most CLIP tools run: PIL full decode, CLIPImageProcessor
            (PIL backend), CLIPVisionModelWithProjection in torch, batch 32, torch.set_num_threads(cores):
            images / wall second of the whole process, and of the loop alone (model already loaded).
Both also report CPU milliseconds per image (user + system, all threads), which a busy shared machine
disturbs far less than wall time. --stages first times decode + preprocess alone and the ORT encoder
alone in one process, and from their CPU cost the ceiling a pipeline could reach on these cores.
A first small run writes the encoder's optimised copy into the cache (a one-time cost, not timed).

Arguments after `--` go to `uclip index` unchanged.

    python bench/bench_index.py --sets 640x480 --repeats 3 --no-baseline --against /tmp/uclip-main

--against DIR also runs `uclip index` from another checkout of uclip (DIR on PYTHONPATH, same interpreter,
bundle, images and arguments), alternating with this one in the same loop: a before/after comparison of a
change on the same machine state.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

SETS = {   # name: (width, height, how many)
    "12mp": (4000, 3000, 60),
    "640x480": (640, 480, 200),
}
BASELINE_BATCH = 32


# ------------------------------------------------------------------------------------------ images

def image_folder(name: str, count: int | None = None) -> Path:
    """The cached folder of generated JPEGs for a set, built when missing."""
    width, height, default = SETS[name]
    count = count or default
    folder = common.CACHE / "images" / f"{name}-{count}"
    if (folder / common.MARKER).is_file():
        return folder
    from image_fixtures import jpeg_bytes, photo_like

    with common.building(f"{count} generated {width}x{height} JPEGs (quality 90) at {folder}"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(count):
            detail = 0.6 if i % 2 == 0 else 0.85   # smooth scenes and foliage-like texture
            (folder / f"photo_{i:04d}.jpg").write_bytes(jpeg_bytes(photo_like(width, height, seed=i, detail=detail), quality=90))
        (folder / common.MARKER).write_text("done\n", encoding="utf-8")
    return folder


def jpegs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


# ------------------------------------------------------------------------------------------ runs

def timed(command: list[str], what: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a process; (its result, wall seconds, CPU seconds of it and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=common.bench_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    return done, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_uclip(folder: Path, bundle: Path, extra: list[str], checkout: Path | None = None) -> dict:
    index = common.CACHE / "tmp-index"
    shutil.rmtree(index, ignore_errors=True)
    program = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(checkout)!r}); "
                                     "from uclip_cli.cli import entry; sys.argv[0] = 'uclip'; entry()"] if checkout else common.uclip_command()
    command = program + ["index", str(folder), "--index", str(index), "--bundle", str(bundle),
                                        "--no-progress", *extra]
    done, wall, cpu = timed(command, "uclip index")
    embedded = int(re.search(r"(\d+) embedded", done.stdout).group(1))
    shutil.rmtree(index, ignore_errors=True)
    return {"n": embedded, "wall": wall, "cpu": cpu, "summary": done.stdout.splitlines()[0]}


def warm_up(folder: Path, bundle: Path, extra: list[str]) -> None:
    """One small index run first: it writes the checksum cache and the encoder's optimised copy (first use only)."""
    one = common.CACHE / "tmp-one-image"
    shutil.rmtree(one, ignore_errors=True)
    one.mkdir()
    shutil.copy(jpegs(folder)[0], one)
    run_uclip(one, bundle, extra)
    shutil.rmtree(one, ignore_errors=True)


def run_baseline(folder: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--baseline-worker", str(folder), "--threads", str(threads)]
    done, wall, cpu = timed(command, "baseline")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"n": figures["n"], "wall": wall, "cpu": cpu, "loop": figures["loop"]}


def baseline_worker(folder: Path, threads: int) -> None:
    """The plain PyTorch + transformers loop; prints {"n", "loop"} as JSON."""
    import torch
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    torch.set_num_threads(threads)
    clip = common.clip_checkpoint()
    model = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
    processor = Processor.from_pretrained(clip)
    paths = jpegs(folder)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(paths), BASELINE_BATCH):
            pictures = [Image.open(p).convert("RGB") for p in paths[first:first + BASELINE_BATCH]]
            pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
            embeddings = model(pixel_values=pixels).image_embeds
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    print(json.dumps({"n": len(paths), "loop": time.perf_counter() - start}))


# ------------------------------------------------------------------------------------------ stages

def stage_rates(folder: Path, bundle: Path, threads: int, workers: int, batch: int) -> float:
    """In one process: decode + preprocess alone (W threads), and the ORT image encoder alone (batch B).

    Prints wall rates and CPU cost (core-ms per image); returns the ceiling this CPU allows a
    whole pipeline: cores x 1000 / (decode + encoder core-ms per image).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from uclip_cli.bundle import IMAGE_ENCODER, load_bundle
    from uclip_cli.images import decode_image, preprocess
    from uclip_cli.sessions import SessionFactory

    b = load_bundle(bundle, verify=False)
    paths = jpegs(folder)

    def prepare(p: Path):
        return preprocess(decode_image(p.read_bytes(), name=str(p), target_size=b.image.size), b.image)

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        pixels = list(pool.map(prepare, paths))
    decode_rate = len(paths) / (time.perf_counter() - start)
    decode_cost = 1000 * (time.process_time() - cpu) / len(paths)
    model = SessionFactory(device="cpu", threads=threads).create(b.file(IMAGE_ENCODER))
    feed = np.stack((pixels * batch)[:batch])
    model.run({"pixel_values": feed})
    rounds = max(2, 64 // batch)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        model.run({"pixel_values": feed})
    encode_rate = rounds * batch / (time.perf_counter() - start)
    encode_cost = 1000 * (time.process_time() - cpu) / (rounds * batch)
    ceiling = 1000 * threads / (decode_cost + encode_cost)
    print(f"  stages: decode+preprocess {decode_rate:6.1f} images/s, {decode_cost:5.1f} core-ms/image ({workers} threads); "
          f"encoder {encode_rate:6.1f} images/s, {encode_cost:5.1f} core-ms/image (batch {batch}, {threads} threads); "
          f"ceiling {ceiling:5.1f} images/s   [{common.load_note()}]")
    return ceiling


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--count", type=int, help="images per set (default: 60 at 12 MP, 200 at 640x480)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the baseline")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--quantize", choices=["int8-all"], help="index with an int8 image encoder (uclip export --quantize int8-all)")
    parser.add_argument("--stages", action="store_true", help="also time decode alone and the encoder alone")
    parser.add_argument("--against", type=Path, help="another uclip checkout to run `uclip index` from, alternating")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.baseline_worker:
        baseline_worker(args.baseline_worker, args.threads)
        return

    bundle = common.bundle(args.quantize)
    print(f"bundle {bundle} (ViT-B/32, 224 px, {args.quantize or 'fp32'} image encoder); uclip index {' '.join(extra) or '(defaults)'}; "
          f"baseline: torch {args.threads} threads, batch {BASELINE_BATCH}")
    for name in args.sets:
        folder = image_folder(name, args.count)
        n = len(jpegs(folder))
        print(f"\n{name}: {n} JPEGs in {folder}")
        ceiling = stage_rates(folder, bundle, threads=args.threads, workers=args.threads, batch=32) if args.stages else None
        warm_up(folder, bundle, extra)
        ours_runs, base_runs, other_runs = [], [], []
        for _ in range(args.repeats):   # alternating, so that both meet the same machine load
            if args.against:
                other_runs.append(run_uclip(folder, bundle, extra, args.against))
                print(f"  against   {rate(other_runs[-1]):6.1f} images/s, {cost(other_runs[-1]):5.0f} core-ms/image   "
                      f"[{common.load_note()}]  ({args.against})", flush=True)
            ours_runs.append(run_uclip(folder, bundle, extra))
            print(f"  uclip     {rate(ours_runs[-1]):6.1f} images/s, {cost(ours_runs[-1]):5.0f} core-ms/image   "
                  f"[{common.load_note()}]\n    {ours_runs[-1]['summary']}", flush=True)
            if not args.no_baseline:
                base_runs.append(run_baseline(folder, args.threads))
                b = base_runs[-1]
                print(f"  baseline  {rate(b):6.1f} images/s, {cost(b):5.0f} core-ms/image "
                      f"(loop alone {b['n'] / b['loop']:.1f} images/s)   [{common.load_note()}]", flush=True)
        ours_rate = statistics.median(rate(r) for r in ours_runs)
        line = (f"  => {name}: uclip {ours_rate:.1f} images/s (median of {len(ours_runs)}), "
                f"{statistics.median(cost(r) for r in ours_runs):.0f} core-ms/image")
        if ceiling:
            line += f", {ours_rate / ceiling:.0%} of the ceiling"
        if base_runs:
            base_rate = statistics.median(rate(r) for r in base_runs)
            line += (f"; baseline {base_rate:.1f} images/s, {statistics.median(cost(r) for r in base_runs):.0f} core-ms/image"
                     f"; uclip / baseline {ours_rate / base_rate:.2f}x images/s")
        if other_runs:
            other_rate = statistics.median(rate(r) for r in other_runs)
            line += (f"; against {other_rate:.1f} images/s, {statistics.median(cost(r) for r in other_runs):.0f} core-ms/image"
                     f"; this / against {ours_rate / other_rate:.3f}x images/s")
        print(line, flush=True)


def rate(run: dict) -> float:
    return run["n"] / run["wall"]


def cost(run: dict) -> float:
    """CPU milliseconds the whole process spent per image."""
    return 1000 * run["cpu"] / run["n"]


if __name__ == "__main__":
    main()

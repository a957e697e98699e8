"""Indexing speed, whole process: `uclip index` against a plain PyTorch + transformers loop, same images, one run.

    python bench/bench_index.py                              # 60 x 12 MP and 200 x 640x480 JPEGs
    python bench/bench_index.py --sets 12mp --repeats 2 -- --batch-size 16 --workers 1
    python bench/bench_index.py --stages                     # also: decode-only and encoder-only rates

Images are generated once (photo-like, JPEG quality 90) and cached with the full-size ViT-B/32 bundle
under $UCLIP_BENCH_CACHE (see bench/common.py). For each set and repeat:

  uclip     `uclip index DIR` in a new process on a fresh index: images / wall-clock second of the
            whole process (interpreter, imports, bundle, session, walk, decode, encode, commits).
  baseline  a new process running the loop most CLIP tools run: PIL full decode, CLIPImageProcessor
            (PIL backend), CLIPVisionModelWithProjection in torch, batch 32, torch.set_num_threads(cores):
            images / wall second of the whole process, and of the loop alone (model already loaded).

Arguments after `--` go to `uclip index` unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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

def run_uclip(folder: Path, bundle: Path, extra: list[str]) -> dict:
    index = common.CACHE / "tmp-index"
    shutil.rmtree(index, ignore_errors=True)
    command = common.uclip_command() + ["index", str(folder), "--index", str(index), "--bundle", str(bundle),
                                        "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, env=common.bench_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"uclip index failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    embedded = int(re.search(r"(\d+) embedded", done.stdout).group(1))
    shutil.rmtree(index, ignore_errors=True)
    return {"n": embedded, "wall": wall, "summary": done.stdout.splitlines()[0]}


def run_baseline(folder: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--baseline-worker", str(folder), "--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, env=common.bench_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"baseline failed ({done.returncode}):\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"n": figures["n"], "wall": wall, "loop": figures["loop"]}


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

def stage_rates(folder: Path, bundle: Path, threads: int, workers: int, batch: int) -> None:
    """In one process: decode + preprocess alone (W threads), and the ORT image encoder alone (batch B)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from uclip_cli.bundle import IMAGE_ENCODER, load_bundle
    from uclip_cli.images import decode_image, preprocess
    from uclip_cli.sessions import SessionFactory

    b = load_bundle(bundle, verify=False)
    paths = jpegs(folder)

    def prepare(p: Path):
        return preprocess(decode_image(p.read_bytes(), name=str(p), target_size=b.image.size), b.image)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pixels = list(pool.map(prepare, paths))
    decode = len(paths) / (time.perf_counter() - start)
    model = SessionFactory(device="cpu", threads=threads).create(b.file(IMAGE_ENCODER))
    feed = np.stack(pixels[:batch])
    model.run({"pixel_values": feed})
    start = time.perf_counter()
    rounds = max(1, 64 // batch)
    for _ in range(rounds):
        model.run({"pixel_values": feed})
    encode = rounds * batch / (time.perf_counter() - start)
    print(f"  stages: decode+preprocess {decode:6.1f} images/s ({workers} threads)   "
          f"encoder {encode:6.1f} images/s (batch {batch}, {threads} ORT threads)   [{common.load_note()}]")


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--count", type=int, help="images per set (default: 60 at 12 MP, 200 at 640x480)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the baseline")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--stages", action="store_true", help="also time decode alone and the encoder alone")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.baseline_worker:
        baseline_worker(args.baseline_worker, args.threads)
        return

    bundle = common.bundle(None)
    print(f"bundle {bundle} (ViT-B/32, 224 px, fp32); uclip index {' '.join(extra) or '(defaults)'}; "
          f"baseline: torch {args.threads} threads, batch {BASELINE_BATCH}")
    for name in args.sets:
        folder = image_folder(name, args.count)
        n = len(jpegs(folder))
        print(f"\n{name}: {n} JPEGs in {folder}")
        if args.stages:
            stage_rates(folder, bundle, threads=args.threads, workers=args.threads, batch=8)
        for repeat in range(args.repeats):
            ours = run_uclip(folder, bundle, extra)
            line = f"  uclip     {ours['n'] / ours['wall']:6.1f} images/s whole process ({ours['wall']:.1f} s)"
            if not args.no_baseline:
                base = run_baseline(folder, args.threads)
                line += (f"   baseline {base['n'] / base['wall']:6.1f} images/s whole process, "
                         f"{base['n'] / base['loop']:6.1f} loop only   ratio {base['wall'] / ours['wall']:.2f}x "
                         f"(vs loop only {base['loop'] / ours['wall']:.2f}x)")
            print(f"{line}   [{common.load_note()}]", flush=True)
            print(f"    {ours['summary']}")


if __name__ == "__main__":
    main()

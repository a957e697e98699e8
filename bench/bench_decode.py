"""Decode + preprocess cost per image, full decode vs JPEG draft mode, and what draft mode changes.

    python bench/bench_decode.py [--repeats 15] [--seeds 2]

Prints, for generated photo-like JPEGs (quality 90):
  - ms per image (one core) for decode only and decode + preprocess, full decode vs draft decode,
    at 4000x3000 (12 MP), 6000x4000 (24 MP) and 640x480;
  - for draft factors 1, 2, 3 (short side kept >= factor x 224) at 2400x1800 (the worst case of
    factor 2: short side exactly 2 x 224), 4000x3000 and 6000x4000: the decoded size and the max /
    mean abs difference of the final CLIP-normalised 224 px tensor against the full decode;
  - for scale, the difference caused by saving the same photo at JPEG quality 85 instead of 90.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from image_fixtures import jpeg_bytes, photo_like  # noqa: E402

from uclip_cli import images  # noqa: E402
from uclip_cli.bundle import ImageSettings  # noqa: E402

SETTINGS = ImageSettings()  # CLIP ViT-B/32: 224 px, bicubic, centre crop


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def tensor(data: bytes, target_size: int | None) -> np.ndarray:
    return images.preprocess(images.decode_image(data, name="bench", target_size=target_size), SETTINGS)


def with_factor(factor: int, fn):
    saved = images.DRAFT_FACTOR
    images.DRAFT_FACTOR = factor
    try:
        return fn()
    finally:
        images.DRAFT_FACTOR = saved


def timing(label: str, data: bytes, repeats: int) -> None:
    decoded = images.decode_image(data, name="bench", target_size=SETTINGS.size)
    full_decode = median_ms(lambda: images.decode_image(data, name="bench", target_size=None), repeats)
    draft_decode = median_ms(lambda: images.decode_image(data, name="bench", target_size=SETTINGS.size), repeats)
    full_total = median_ms(lambda: tensor(data, None), repeats)
    draft_total = median_ms(lambda: tensor(data, SETTINGS.size), repeats)
    print(f"{label}: decoded by draft mode at {decoded.size[0]}x{decoded.size[1]} (DRAFT_FACTOR={images.DRAFT_FACTOR})")
    print(f"  decode only          full {full_decode:7.1f} ms   draft {draft_decode:7.1f} ms")
    print(f"  decode + preprocess  full {full_total:7.1f} ms   draft {draft_total:7.1f} ms"
          f"   -> {1000 / full_total:6.1f} vs {1000 / draft_total:6.1f} images/s on one core")


def differences(width: int, height: int, photos: list[bytes], factors: tuple[int, ...]) -> None:
    """Max / mean abs diff of the final tensor, draft vs full decode, over `photos`."""
    full = [tensor(data, None) for data in photos]
    for factor in factors:
        drafts = [with_factor(factor, lambda d=data: tensor(d, SETTINGS.size)) for data in photos]
        size = with_factor(factor, lambda: images.decode_image(photos[0], name="b", target_size=SETTINGS.size).size)
        diffs = [np.abs(a - b) for a, b in zip(drafts, full)]
        print(f"  {width}x{height}  factor {factor}: decoded at {size[0]:4d}x{size[1]:<4d} (short side {min(size) / SETTINGS.size:.2f} x 224)"
              f"   max {max(d.max() for d in diffs):.3f}   mean {min(d.mean() for d in diffs):.4f}-{max(d.mean() for d in diffs):.4f}")


def quality_step(photos: list) -> None:
    """The same photos saved at JPEG quality 85 instead of 90, both fully decoded: a scale for the figures above."""
    diffs = [np.abs(tensor(jpeg_bytes(p, quality=85), None) - tensor(jpeg_bytes(p, quality=90), None)) for p in photos]
    print(f"  reference, JPEG quality 85 vs 90 (full decode): max {max(d.max() for d in diffs):.3f}"
          f"   mean {min(d.mean() for d in diffs):.4f}-{max(d.mean() for d in diffs):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2, help="photos per texture level (smooth, detailed) per size")
    args = parser.parse_args()

    big = jpeg_bytes(photo_like(4000, 3000, seed=1), quality=90)
    huge = jpeg_bytes(photo_like(6000, 4000, seed=2), quality=90)
    small = jpeg_bytes(photo_like(640, 480, seed=3), quality=90)
    print(f"JPEG quality 90: 12 MP {len(big) / 1e6:.1f} MB, 24 MP {len(huge) / 1e6:.1f} MB, 640x480 {len(small) / 1e3:.0f} kB")
    timing("4000x3000 (12 MP)", big, args.repeats)
    timing("6000x4000 (24 MP)", huge, args.repeats)
    timing("640x480", small, args.repeats * 4)
    del big, huge

    print("\nFinal 224 px CLIP tensor, draft vs full decode (abs diff; one grey level = 0.015)")
    for width, height in ((2400, 1800), (4000, 3000), (6000, 4000)):
        pictures = [photo_like(width, height, seed=10 + s, detail=detail)
                    for detail in (0.6, 0.85) for s in range(args.seeds)]
        differences(width, height, [jpeg_bytes(p, quality=90) for p in pictures], factors=(1, 2, 3))
        if (width, height) == (4000, 3000):
            quality_step(pictures)

if __name__ == "__main__":
    main()

"""Generated test images: photo-like pictures and the fixture folder for end-to-end tests.

Everything is seeded, so the same call writes the same bytes (golden outputs stay stable) for a
given Pillow / libjpeg / libwebp build.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_like(width: int, height: int, seed: int, detail: float = 0.6) -> Image.Image:
    """An RGB picture with the spectrum of a photo: smooth light, textures, sharp-edged shapes, sensor noise.

    `detail` is the weight kept from one octave of texture to the next finer one: 0.6 looks like
    sky and walls, 0.85 like foliage or gravel (the hard case for reduced-scale decoding).
    """
    rng = np.random.default_rng(seed)
    pixels = _fractal_noise(rng, width, height, detail)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    picture = Image.fromarray(np.clip(pixels + base, 0, 255).astype(np.uint8))
    _draw_shapes(picture, rng)
    picture = picture.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 2000))
    grain = 3.0 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return Image.fromarray(np.clip(np.asarray(picture, np.float32) + grain, 0, 255).astype(np.uint8))


def _fractal_noise(rng: np.random.Generator, width: int, height: int, detail: float) -> np.ndarray:
    """Noise with a falling spectrum (about 1/f): each octave doubles the grid and adds finer, weaker noise."""
    side = 2
    weight = 90.0
    noise = weight * rng.standard_normal((side, side, 3), dtype=np.float32)
    while side < max(width, height) // 4:
        side, weight = side * 2, weight * detail
        noise = _resize_float(noise, side, side) + weight * rng.standard_normal((side, side, 3), dtype=np.float32)
    return _resize_float(noise, width, height)


def _resize_float(values: np.ndarray, width: int, height: int) -> np.ndarray:
    channels = [Image.fromarray(np.ascontiguousarray(values[..., c]), mode="F").resize((width, height), Image.Resampling.BICUBIC)
                for c in range(values.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def _draw_shapes(picture: Image.Image, rng: np.random.Generator, count: int = 12) -> None:
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for _ in range(count):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=max(1, int(min(width, height) / 100)))


def jpeg_bytes(picture: Image.Image, quality: int = 90, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality, **options)
    return out.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def rotated_jpeg(picture: Image.Image, orientation: int = 6) -> bytes:
    """JPEG of `picture` with an EXIF Orientation tag: viewers rotate it (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(picture, exif=exif.tobytes())


def _save(picture: Image.Image, path: Path, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, fmt, **options)


def _heic_writable() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return bool(pillow_heif.libheif_info().get("HEIF"))


def make_photo_folder(root: Path) -> dict:
    """Write the end-to-end fixture folder under `root`; describe it.

    Returns {"good": [relative paths that must be indexed],
             "bad": {relative path: expected ImageDecodeError kind},
             "hidden": [relative paths skipped by default as hidden],
             "loop": relative path of the symlink loop (absent where symlinks are unavailable),
             "rotated": relative path of the EXIF-rotated photo, stored 300x200, shown 200x300,
             "formats": {relative path of a good file: its format}}.
    Relative paths use "/" and are relative to `root`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    formats: dict[str, str] = {}

    def add(rel: str, picture: Image.Image, fmt: str, **options) -> None:
        _save(picture, root / rel, fmt, **options)
        good.append(rel)
        formats[rel] = fmt

    sizes = [(320, 240), (240, 320), (500, 180), (64, 64), (800, 600), (97, 131)]
    pictures = [photo_like(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    add("beach.jpg", pictures[0], "JPEG", quality=90)
    add("portrait.jpeg", pictures[1], "JPEG", quality=85)
    add("panorama.png", pictures[2], "PNG")
    add("icons/tiny.webp", pictures[3], "WEBP", quality=80)
    add("icons/logo.gif", pictures[3].quantize(64), "GIF")
    add("scans/page.bmp", pictures[5], "BMP")
    add("scans/page.tiff", pictures[4], "TIFF", compression="tiff_lzw")
    add("transparent.png", _with_alpha(pictures[5]), "PNG")
    add("albums/2024/mačka na kauču.jpg", pictures[4], "JPEG", quality=92)
    add("日本/写真.png", pictures[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")
    add("animated.gif", pictures[3].quantize(32), "GIF",
        save_all=True, append_images=[pictures[0].resize((64, 64)).quantize(32)], duration=100, loop=0)
    if _heic_writable():
        add("phone/IMG_0001.heic", pictures[1], "HEIF", quality=80)

    rotated = "albums/2024/rotated.jpg"
    (root / rotated).write_bytes(rotated_jpeg(photo_like(300, 200, seed=42), orientation=6))
    good.append(rotated)
    formats[rotated] = "JPEG"

    bad = {
        "broken/corrupt.jpg": "corrupt",
        "broken/truncated.png": "truncated",
        "broken/empty.jpg": "empty",
        "broken/notes.jpg": "not_image",
        "broken/bomb.png": "too_large",
    }
    full_jpeg = jpeg_bytes(pictures[4])
    _write(root / "broken/corrupt.jpg", corrupt_jpeg(full_jpeg))
    png = io.BytesIO()
    pictures[4].save(png, "PNG")
    _write(root / "broken/truncated.png", png.getvalue()[: len(png.getvalue()) // 2])
    _write(root / "broken/empty.jpg", b"")
    _write(root / "broken/notes.jpg", "shopping list: milk, eggs, bread\n".encode())
    _write(root / "broken/bomb.png", huge_png_header())

    hidden = [".hidden.jpg", ".thumbnails/cache.png"]
    _write(root / ".hidden.jpg", jpeg_bytes(pictures[3]))
    _save(pictures[3], root / ".thumbnails/cache.png", "PNG")

    result = {"good": sorted(good), "bad": bad, "hidden": hidden, "rotated": rotated, "formats": formats}
    loop = root / "albums/loop"
    try:
        os.symlink("..", loop, target_is_directory=True)
        result["loop"] = "albums/loop"
    except (OSError, NotImplementedError):
        pass
    return result


def _with_alpha(picture: Image.Image) -> Image.Image:
    rgba = picture.convert("RGBA")
    width, height = picture.size
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    rgba.putalpha(Image.fromarray(ramp))
    return rgba


def corrupt_jpeg(jpeg: bytes) -> bytes:
    """Keep the JPEG headers, replace the entropy-coded data after the start of scan with garbage."""
    start_of_scan = jpeg.index(b"\xff\xda")
    rng = np.random.default_rng(7)
    garbage = rng.integers(0, 256, len(jpeg) - start_of_scan - 40, dtype=np.uint8).tobytes()
    return jpeg[: start_of_scan + 20] + b"\xff\xd0\xff\x00" + garbage


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_exif_photo(path: Path, seed: int, *, size: tuple[int, int] = (96, 64), taken: str | None = None,
                     offset: str | None = None, make: str | None = None, model: str | None = None,
                     lens: str | None = None, gps: tuple[float, float] | None = None,
                     orientation: int | None = None) -> Path:
    """A photo-like JPEG carrying real EXIF as a camera writes it: DateTimeOriginal ("YYYY:MM:DD HH:MM:SS")
    and OffsetTimeOriginal in the Exif IFD, Make/Model/Orientation in IFD0, LensModel, and a GPS IFD of
    (degrees, minutes, seconds) ratios with N/S and E/W references."""
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if orientation:
        exif[0x0112] = orientation
    details = exif.get_ifd(0x8769)
    if taken:
        details[0x9003] = taken
    if offset:
        details[0x9011] = offset
    if lens:
        details[0xA434] = lens
    if gps:
        def dms(value: float) -> tuple:
            value = abs(value)
            degrees, minutes = int(value), int(value * 60) % 60
            seconds = round((value * 3600) % 60, 4)
            return (IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(int(seconds * 10_000), 10_000))

        place = exif.get_ifd(0x8825)
        place[1], place[2] = ("N" if gps[0] >= 0 else "S"), dms(gps[0])
        place[3], place[4] = ("E" if gps[1] >= 0 else "W"), dms(gps[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo_like(*size, seed=seed), exif=exif.tobytes()))
    return path

"""Torch-free image decoding and CLIP / SigLIP preprocessing (numpy + Pillow only).

`decode_image` turns a file's bytes into an RGB `PIL.Image` (EXIF orientation applied, first frame
of animations, transparency composited on white, decompression bombs refused before decoding,
large JPEGs decoded at reduced scale). `preprocess` turns an RGB image into the float32 [3, H, W]
tensor the image encoder expects, equal to transformers' PIL-backend `CLIPImageProcessor` /
`SiglipImageProcessor` (bit-for-bit in practice; tests hold it to 1e-6).

Every file that cannot be decoded raises `ImageDecodeError` with a `kind` (a stable category for
reports) and a short `reason` for people.
"""
from __future__ import annotations

import functools
import io
import os
import re
import stat
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, features

from .bundle import ImageSettings
from .errors import UclipError
from .index.records import PhotoMeta
from .photo_meta import meta_of
from .walk import IMAGE_EXTENSIONS, file_type  # noqa: F401 - the one list lives in walk.py; re-exported for callers of images

# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS by default):
# about 13,400 x 13,400 px, far above any camera and far below what exhausts memory.
MAX_PIXELS = 178_956_970

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow draft mode, DCT-domain scaling) only while
# its short side stays >= DRAFT_FACTOR x the encoder's input size. Measured with
# `python bench/bench_decode.py` on generated photo-like JPEGs (quality 90), final 224 px
# CLIP-normalised tensor, draft vs full decode, abs diff (one grey level = 0.015 in these units):
#   worst case, short side exactly 2 x 224 (2400x1800 -> 600x450):  max 0.075-0.09, mean <= 0.008
#   12 MP (4000x3000 -> 1000x750):                                  max 0.030,      mean <= 0.0035
#   24 MP (6000x4000 -> 750x500):                                   max 0.060,      mean <= 0.0066
#   factor 1 instead (short side down to 1 x 224):                  max 0.13-0.53,  mean up to 0.045
#   for scale, the same photo saved at JPEG quality 85 instead of 90: max 0.043,   mean <= 0.0041
# Stated tolerance (tests hold it): max abs diff <= 0.12 and mean <= 0.01 against the full decode.
# A 12 MP decode + preprocess drops from about 160 ms to 25 ms on one core.
DRAFT_FACTOR = 2


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# uclip applies its own cap (MAX_PIXELS) before decoding; Pillow's warning for 89-179 MP images is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(UclipError):
    """A file that cannot become an image.

    kind: one of "empty", "not_image", "corrupt", "truncated", "too_large", "unsupported", "unreadable".
    reason: short text for people, e.g. "corrupt JPEG", "image too large: 50000x50000 px exceeds ...".
    """

    KINDS = ("empty", "not_image", "corrupt", "truncated", "too_large", "unsupported", "unreadable")

    def __init__(self, name: str, kind: str, reason: str):
        assert kind in self.KINDS, kind
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.kind = kind
        self.reason = reason

    def __reduce__(self):  # survives the trip back from a decoding worker process
        return type(self), (self.name, self.kind, self.reason)


@functools.cache
def heif_available() -> bool:
    """True when HEIC/HEIF files can be decoded (pillow-heif installed); registers its opener once."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def avif_available() -> bool:
    """True when this Pillow build decodes AVIF (Pillow >= 11.3 with libavif)."""
    return bool(features.check("avif"))


# Reading is bounded: an image within MAX_PIXELS cannot take more bytes than its format's worst legitimate
# encoding of that many pixels, so a larger file is refused before it is read (a 20 GB sparse "big.jpg")
# and a file that grows past the cap while being read stops being read. Worst cases per pixel: 16-bit RGBA
# TIFF / PNG (stored, unfiltered) 8 bytes; 10/12-bit HEIF / AVIF 6; CMYK JPEG or lossless WebP 4; BMP 4;
# GIF 2. Unknown signatures get the largest. Metadata (EXIF, ICC, XMP, thumbnails) gets a flat allowance.
BYTES_PER_PIXEL = {"JPEG": 4, "PNG": 8, "TIFF": 8, "BMP": 4, "GIF": 2, "WebP": 4, "HEIC": 6, "AVIF": 6}
METADATA_ALLOWANCE = 64 << 20
READ_CHUNK = 1 << 20
READ_SECONDS = 120.0       # a file still not read after this long (a trickling network filesystem) is given up
_HEAD = 32                 # bytes enough for every signature in _signature_format


def byte_cap(fmt: str | None, max_pixels: int = MAX_PIXELS) -> int:
    """The most bytes a file of this format (None: unknown) may have and still hold an image within max_pixels."""
    return max_pixels * BYTES_PER_PIXEL.get(fmt or "", max(BYTES_PER_PIXEL.values())) + METADATA_ALLOWANCE


def read_image_bytes(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None,
                     read_seconds: float = READ_SECONDS) -> bytes:
    """The whole file, or ImageDecodeError naming why it was not read.

    Hostile files cannot hang or exhaust memory: the file is opened without blocking (a FIFO swapped
    in after the walk opens at once instead of waiting for a writer) and must be a regular file on the
    open descriptor (a FIFO, a device such as /dev/zero behind a symlink, a socket, a folder: refused);
    its size is checked against `byte_cap` of the format its first bytes claim (or `max_bytes`) before
    the rest is read, and reading stops past the cap (a file that grows) or after `read_seconds`.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ImageDecodeError(name, "unreadable", "unreadable: permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "unreadable", "unreadable: is a directory") from None
    except OSError as e:
        raise ImageDecodeError(name, "unreadable", f"unreadable: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageDecodeError(name, "unreadable", "unreadable: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(name, "unreadable", f"unreadable: is {file_type(st.st_mode)}, not a regular file")
        started = time.monotonic()
        head = _read_some(fd, _HEAD, name)
        fmt = _signature_format(head)
        cap = max_bytes if max_bytes is not None else byte_cap(fmt, max_pixels)
        if st.st_size > cap:
            raise _too_many_bytes(name, st.st_size, cap, fmt, max_pixels)
        parts = [head]
        total = len(head)
        while True:
            if time.monotonic() - started > read_seconds:
                raise ImageDecodeError(name, "unreadable", f"unreadable: not read within {read_seconds:g} s (a hung filesystem?)")
            chunk = _read_some(fd, min(READ_CHUNK, cap + 1 - total), name)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > cap:
                raise _too_many_bytes(name, None, cap, fmt, max_pixels)
        return b"".join(parts)
    finally:
        os.close(fd)


def _read_some(fd: int, n: int, name: str) -> bytes:
    if n <= 0:
        return b""
    try:
        return os.read(fd, n)
    except BlockingIOError:   # regular files never block; kept for filesystems that say otherwise
        raise ImageDecodeError(name, "unreadable", "unreadable: the file would block") from None
    except OSError as e:
        raise ImageDecodeError(name, "unreadable", f"unreadable: {e.strerror or e}") from None


def _too_many_bytes(name: str, size: int | None, cap: int, fmt: str | None, max_pixels: int) -> ImageDecodeError:
    what = f"a {fmt} image" if fmt else "an image"
    size_text = f"{_gigabytes(size)}" if size is not None else f"more than {_gigabytes(cap)} (still growing)"
    return ImageDecodeError(name, "too_large", f"file too large: {size_text}, more than {what} within the "
                                               f"{max_pixels}-pixel cap can take ({_gigabytes(cap)})")


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def decode_image(
    data: bytes, *, name: str, target_size: int | None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode a file's bytes into an RGB image ready for `preprocess` (decode_photo without the metadata)."""
    return decode_photo(data, name=name, target_size=target_size, max_pixels=max_pixels)[0]


def decode_photo(
    data: bytes, *, name: str, target_size: int | None, max_pixels: int = MAX_PIXELS, mtime_ns: int | None = None
) -> tuple[Image.Image, PhotoMeta | None]:
    """Decode a file's bytes into an RGB image ready for `preprocess`, and (given the file's `mtime_ns`) its
    metadata read from the header this decode parses anyway (photo_meta.meta_of: no second read).

    - refuses images whose declared width x height exceeds `max_pixels`, before decoding any pixel
      (Pillow's own guard also refuses above 2 x Image.MAX_IMAGE_PIXELS, which equals MAX_PIXELS);
    - with `target_size` (the encoder's input side), decodes JPEGs at 1/2, 1/4 or 1/8 scale while
      the short side stays >= DRAFT_FACTOR x target_size (see DRAFT_FACTOR for the measured effect);
    - applies the EXIF orientation; takes the first frame of GIF / WebP / TIFF animations and pages;
    - converts to RGB as transformers' processors do (transparency composited on white), except that
      16-bit and float greyscale is scaled to 8 bits instead of clipped to white.
    Raises ImageDecodeError for anything else.
    """
    if not data:
        raise ImageDecodeError(name, "empty", "empty file")
    if _is_isobmff(data):
        heif_available()
    image = _open(data, name)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            name, "too_large", f"image too large: {width}x{height} px exceeds the {max_pixels}-pixel cap"
        )
    meta = None if mtime_ns is None else meta_of(image, mtime_ns)   # before the orientation is applied (and dropped)
    _decode(image, name, min_short_side=DRAFT_FACTOR * target_size if target_size else None)
    _apply_orientation(image)
    try:
        return to_rgb(image), meta
    except Exception as e:  # noqa: BLE001
        raise _damaged(name, image.format or "image", e) from None


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb(name, str(e)) from None
    except Image.UnidentifiedImageError:
        raise _unidentified(data, name) from None
    except Exception as e:  # noqa: BLE001 - any failure of a decoder is a property of the file
        raise _damaged(name, _signature_format(data) or "image", e) from None


def _bomb(name: str, pillow_message: str) -> ImageDecodeError:
    """Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS, = MAX_PIXELS by default) refused the header first."""
    numbers = re.findall(r"\d+", pillow_message)
    if len(numbers) >= 2:
        return ImageDecodeError(
            name, "too_large", f"image too large: {numbers[0]} px exceeds the {numbers[1]}-pixel cap"
        )
    return ImageDecodeError(name, "too_large", f"image too large: {pillow_message}")


def _decode(image: Image.Image, name: str, min_short_side: int | None) -> None:
    """Decode every pixel of the first frame, so that damage surfaces here; JPEGs at reduced scale
    when the short side stays >= min_short_side."""
    fmt = image.format or "image"
    try:
        scale = _draft_scale(*image.size, min_short_side) if min_short_side and fmt == "JPEG" else 1
        if scale > 1:
            image.draft("RGB", (image.width // scale, image.height // scale))
        image.load()
    except MemoryError:
        raise ImageDecodeError(name, "too_large", f"image too large: out of memory decoding {fmt}") from None
    except Exception as e:  # noqa: BLE001
        raise _damaged(name, fmt, e) from None


def _draft_scale(width: int, height: int, min_short_side: int) -> int:
    """The largest JPEG DCT scale-down (8, 4, 2) that keeps the short side >= min_short_side, or 1.

    Only scales that divide both sides: otherwise libjpeg's last row and column stand for a
    fraction of a block, the reduced image's aspect ratio drifts, and the 224 px crop shifts
    (measured: 3000x2250 at 1/4 = 750x563 moved the tensor by a mean 0.02, six times the aligned case).
    """
    for scale in (8, 4, 2):
        if width % scale == 0 and height % scale == 0 and min(width, height) // scale >= min_short_side:
            return scale
    return 1


def _damaged(name: str, fmt: str, error: Exception) -> ImageDecodeError:
    message = str(error)
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return ImageDecodeError(name, "truncated", f"truncated {fmt} file")
    return ImageDecodeError(name, "corrupt", f"corrupt {fmt}: {message}".rstrip(": "))


def _apply_orientation(image: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not cost the photo; keep it unrotated
        pass


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def _is_isobmff(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def _signature_format(data: bytes) -> str | None:
    """The image format a file's first bytes claim, whether or not it decodes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if _is_isobmff(data):
        brand = data[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIC"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


def _unidentified(data: bytes, name: str) -> ImageDecodeError:
    fmt = _signature_format(data)
    if fmt == "HEIC" and not heif_available():
        from .extras import install_command

        return ImageDecodeError(name, "unsupported", f"HEIC support not installed: {install_command('heif')}")
    if fmt == "AVIF" and not avif_available():
        return ImageDecodeError(name, "unsupported", "AVIF support missing: needs Pillow >= 11.3 built with libavif")
    if fmt is not None:
        return ImageDecodeError(name, "corrupt", f"corrupt {fmt}")
    if _looks_like_text(data):
        return ImageDecodeError(name, "not_image", "not an image (text file)")
    return ImageDecodeError(name, "not_image", "not an image (unrecognised format)")


def _looks_like_text(data: bytes) -> bool:
    head = data[:1024]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return True


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` does it: transparency composited on white."""
    if image.mode == "RGB":
        return image
    image = _high_depth_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale to 8 bits by scaling; Pillow's convert would clip it to white."""
    if image.mode.startswith("I") and image.mode != "I;8":
        values = np.asarray(image).astype(np.int64)
        if values.max(initial=0) > 255:
            values = values >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image


def resize_target(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """(width, height) after the resize step, rounded exactly as transformers rounds it."""
    if settings.resize_mode == "exact":
        return settings.size, settings.size
    if settings.resize_mode != "shortest_edge":
        raise ValueError(f"unknown resize_mode {settings.resize_mode!r} in the bundle's image settings")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(settings.size * long / short)
    return (settings.size, new_long) if width <= height else (new_long, settings.size)


def preprocess(image: Image.Image, settings: ImageSettings) -> np.ndarray:
    """float32 [3, H, W]: resize (PIL), centre-crop, rescale, normalise, as transformers' PIL backend."""
    return normalise(resize_crop(image, settings), settings)


def resize_crop(image: Image.Image, settings: ImageSettings) -> np.ndarray:
    """uint8 [H, W, 3]: the resize and crop steps of `preprocess` (a quarter of the bytes of its result,
    for shipping pixels between processes; `normalise` finishes them, bit for bit as `preprocess`)."""
    rgb = to_rgb(image)
    try:
        resample = _RESAMPLE[settings.resample]
    except KeyError:
        raise ValueError(f"unknown resample {settings.resample!r} in the bundle's image settings") from None
    pixels = np.asarray(rgb.resize(resize_target(*rgb.size, settings), resample=resample))
    if settings.crop:
        pixels = _center_crop(pixels, settings.size)
    return pixels


def normalise(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: rescale and normalise (elementwise, so a batch equals its images)."""
    # Same arithmetic and dtypes as transformers: rescale in float64, then normalise in float32.
    scaled = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    normalised = (scaled - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(normalised, -1, -3))


def preprocess_batch(images: list[Image.Image], settings: ImageSettings) -> np.ndarray:
    """float32 [B, 3, H, W]."""
    return np.stack([preprocess(image, settings) for image in images])


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C]; the resize step already made both sides >= size."""
    height, width = pixels.shape[:2]
    top = (height - size) // 2
    left = (width - size) // 2
    return pixels[top:top + size, left:left + size]


def claimed_format(head: bytes) -> str | None:
    """The image format the first bytes of a file claim ("JPEG", "PNG", "HEIC", ...; None: no image signature),
    whether or not it decodes. `uclip serve` checks a file is an image before sending its bytes."""
    return _signature_format(head)

"""A photo's metadata (records.PhotoMeta) from its header: capture time, camera, lens, orientation, size, GPS.

Read where the bytes already are, never as a second read of the file: `uclip index` decodes every new
photo with Pillow (images.decode_photo), and Pillow's `Image.open` has parsed the header (EXIF included)
before any pixel is decoded, so `meta_of(image)` costs the EXIF parse alone. Content the index already
holds (a move, a copy) is hashed from bytes in memory: `meta_of_bytes` opens that header without decoding
pixels. An index made before metadata existed is filled in by `read_meta_file` (the header only: Pillow
reads up to the first image data, a few KB of a JPEG), never re-embedded.

Values a camera wrote wrong are dropped, not guessed: a DateTimeOriginal that is no date ("0000:00:00
00:00:00", blanks) falls back to the file's mtime; GPS coordinates out of range, or a ratio with a zero
denominator, count as no position. Nothing here raises for a property of the file: a damaged EXIF block
means no EXIF (the photo still indexes, as images._apply_orientation keeps it unrotated).
"""
from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING

from .index.records import PhotoMeta

if TYPE_CHECKING:
    from PIL import Image

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
_DATETIME_ORIGINAL, _OFFSET_TIME, _OFFSET_TIME_ORIGINAL, _LENS_MODEL = 0x9003, 0x9010, 0x9011, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4
_EXIF_DATE = re.compile(r"(\d{4})[:-](\d\d)[:-](\d\d)[ T](\d\d):(\d\d):(\d\d)")
_OFFSET = re.compile(r"[+-]\d\d:\d\d")
_SWAPS_SIDES = {5, 6, 7, 8}          # EXIF orientations that turn the picture by 90 degrees
MAX_TEXT = 200                       # make, model, lens: longer is no camera's name


def meta_of(image: "Image.Image", mtime_ns: int) -> PhotoMeta:
    """The metadata of an opened image (header parsed, pixels not needed); its size as stored in the file."""
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - a damaged EXIF block is no EXIF
        exif = {}
    orientation = _integer(exif.get(_ORIENTATION))
    width, height = image.size
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    details = _ifd(exif, _EXIF_IFD)
    taken = _exif_time(details.get(_DATETIME_ORIGINAL))
    offset = _text(details.get(_OFFSET_TIME_ORIGINAL)) or _text(details.get(_OFFSET_TIME))
    lat, lon = _position(_ifd(exif, _GPS_IFD))
    return PhotoMeta(
        taken=taken or _local_time(mtime_ns), taken_source="exif" if taken else "mtime",
        taken_offset=offset if taken and offset and _OFFSET.fullmatch(offset) else None,
        make=_text(exif.get(_MAKE)), model=_text(exif.get(_MODEL)), lens=_text(details.get(_LENS_MODEL)),
        orientation=orientation if orientation in range(1, 9) else None, width=width, height=height, lat=lat, lon=lon,
    )


def meta_of_bytes(data: bytes, mtime_ns: int) -> PhotoMeta | None:
    """The metadata in a file's bytes (header only, no pixel decoded), or None when Pillow cannot open them."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return meta_of(image, mtime_ns)
    except Exception:  # noqa: BLE001 - not an image Pillow opens: no metadata, nothing else changes
        return None


def read_meta_file(path, mtime_ns: int) -> PhotoMeta | None:
    """The metadata of an indexed file, reading its header only (an index made before metadata was kept)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return meta_of(image, mtime_ns)
    except Exception:  # noqa: BLE001 - gone, unreadable or no longer an image: left for the next full read
        return None


def _local_time(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))


def _exif_time(value) -> str | None:
    """"YYYY-MM-DDTHH:MM:SS" from EXIF's "YYYY:MM:DD HH:MM:SS", or None for anything that is no real time."""
    match = _EXIF_DATE.match(_text(value) or "")
    if not match:
        return None
    year, month, day, hour, minute, second = map(int, match.groups())
    if not (1800 <= year <= 2200 and 1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{min(second, 59):02d}"


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    return value[:MAX_TEXT] or None


def _integer(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _ifd(exif, tag: int) -> dict:
    try:
        return dict(exif.get_ifd(tag)) if hasattr(exif, "get_ifd") else {}
    except Exception:  # noqa: BLE001
        return {}


def _position(gps: dict) -> tuple[float | None, float | None]:
    lat = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), "S", 90)
    lon = _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), "W", 180)
    return (lat, lon) if lat is not None and lon is not None else (None, None)


def _degrees(value, ref, negative: str, limit: float) -> float | None:
    """Signed degrees from EXIF's (degrees, minutes, seconds) ratios and N/S or E/W reference."""
    try:
        d, m, s = (float(part) for part in value)
    except Exception:  # noqa: BLE001 - absent, not three numbers, or a zero denominator
        return None
    degrees = d + m / 60 + s / 3600
    if not math.isfinite(degrees) or not 0 <= degrees <= limit:
        return None
    return -degrees if (_text(ref) or "").upper().startswith(negative) else degrees

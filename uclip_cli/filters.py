"""Photo filters: date, camera, place and shape conditions that narrow any query, read one way everywhere.

They arrive three ways and mean the same in each (terms.py's rule: one grammar for the CLI and the server):

    uclip query pláž --after 2019-06 --before 2019-09 --camera "pixel 7" --near 45.81,15.98 --within 20km
    uclip query "pláž after:2019-06 before:2019-09 camera:\"pixel 7\" near:45.81,15.98 within:20km"
    GET /api/search?q=pláž&after=2019-06&before=2019-09&camera=pixel+7&near=45.81,15.98&within=20km

plus `--has-gps` / `has:gps` / `gps=1`, `--portrait`, `--landscape` / `is:portrait`, `is:landscape` /
`shape=portrait|landscape`, and `--tag kočka` / `tag:kočka` / `tag=kočka` (a label `uclip tag` gave: tags.py). Each source lists (key, value, as the user wrote it) and `read_filters` turns
the list into one records.PhotoFilter, so a bad value is one line that quotes what was written and says
what to write, in the writer's own spelling. Conditions from several sources all hold (the later --after
and the earlier --before win; every camera named must match).

- after / before: a year, month or day (2019, 2019-06, 2019-06-14), local time of capture: --after takes
  the period itself and what follows, --before what precedes it, so `--after 2019-06 --before 2019-09` is
  June to August 2019.
- camera: case-insensitive substring of "make model" ("pixel", "canon eos").
- near: LAT,LON in degrees (south and west negative); within: 20km, 500m, 3mi, or a number of km
  (default DEFAULT_WITHIN_KM). Only photos with GPS pass either.
- tag: a label of `uclip tag`, any case ("tag:Kočka" is "kočka"); quoted when it has spaces (tag:"hot dog").
  Several tags: a photo holds them all.

The catalogue applies the filter as a row mask before the search's top-k (index/photo_details.py PhotoDetails.filter_mask), so
`-n 20` means 20 photos that pass.
"""
from __future__ import annotations

import calendar
import math
import re
from typing import Sequence

from .errors import UclipError
from .index.photo_tags import label_key
from .index.records import Near, PhotoFilter

DEFAULT_WITHIN_KM = 10.0
MAX_CAMERA_CHARS = 200
MAX_TAG_CHARS = 200
_DATE = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?")
_UNITS = {"km": 1.0, "m": 0.001, "mi": 1.609344}
_DISTANCE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(km|m|mi)?", re.I)
_NUMBER = r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_PLACE = re.compile(_NUMBER + "," + _NUMBER)
SORTS = ("score", "date", "newest")   # --sort / sort=: best first, the best matches by capture time, newest first
KEYS = ("after", "before", "camera", "near", "within", "gps", "shape", "tag")
SHAPES = ("portrait", "landscape")
# query-text spellings: key:value words (terms.split_filters finds them)
TEXT_KEYS = {"after": "after", "before": "before", "camera": "camera", "near": "near", "within": "within", "tag": "tag"}
TEXT_FLAGS = {"has:gps": ("gps", "1"), "is:portrait": ("shape", "portrait"), "is:landscape": ("shape", "landscape")}


class FilterError(UclipError):
    """A filter value that cannot be read; the message quotes it and says what to write."""


def read_filters(given: Sequence[tuple[str, str, str]]) -> PhotoFilter:
    """One PhotoFilter from (key, value, shown) triples, key in KEYS, shown as the user wrote it
    ("--after 2019-13", "after:2019-13", "after=2019-13"); FilterError names the first bad one."""
    after: list[tuple[str, str]] = []
    before: list[tuple[str, str]] = []
    cameras: list[str] = []
    places: list[tuple[float, float]] = []
    within: list[tuple[float, str]] = []
    shapes: dict[str, str] = {}
    tags: list[str] = []
    gps = False
    for key, value, shown in given:
        value = value.strip()
        if key == "after":
            after.append((_period(value, shown), shown))
        elif key == "before":
            before.append((_period(value, shown), shown))
        elif key == "camera":
            if not value or len(value) > MAX_CAMERA_CHARS:
                raise FilterError(f"{shown}: give part of a camera's make or model, e.g. \"pixel 7\" or canon")
            cameras.append(value)
        elif key == "near":
            places.append(_place(value, shown))
        elif key == "within":
            within.append((_distance(value, shown), shown))
        elif key == "gps":
            gps = True
        elif key == "shape":
            if value not in SHAPES:
                raise FilterError(f"{shown}: give portrait or landscape")
            shapes[value] = shown
        elif key == "tag":
            if not label_key(value) or len(value) > MAX_TAG_CHARS:
                raise FilterError(f"{shown}: give a label that `uclip tag` gave (`uclip tags` lists them), e.g. tag:beach")
            tags.append(label_key(value))
        else:
            raise ValueError(f"unknown filter key {key!r}")
    if len(shapes) > 1:
        raise FilterError(f"{' and '.join(shapes.values())}: a photo is one or the other: keep one")
    if within and not places:
        raise FilterError(f"{within[0][1]} needs a place: add near LAT,LON (e.g. --near 45.81,15.98)")
    if len(within) > 1 and len({km for km, _ in within}) > 1:
        raise FilterError(f"{within[0][1]} and {within[1][1]}: give one distance")
    km = within[0][0] if within else DEFAULT_WITHIN_KM
    start = max(after, default=(None, ""))
    end = min(before, default=(None, ""))
    if start[0] and end[0] and start[0] >= end[0]:
        raise FilterError(f"{start[1]} and {end[1]}: no date is both: give an --after before the --before")
    return PhotoFilter(after=start[0], before=end[0], cameras=tuple(dict.fromkeys(cameras)),
                       near=tuple(Near(lat, lon, km) for lat, lon in dict.fromkeys(places)), has_gps=gps,
                       shape=next(iter(shapes), None), tags=tuple(dict.fromkeys(tags)))


def _period(value: str, shown: str) -> str:
    """"2019", "2019-06" or "2019-06-14" as the prefix of a capture time ("2019-06", zero-padded)."""
    match = _DATE.fullmatch(value)
    if match:
        year, month, day = match.group(1), match.group(2), match.group(3)
        if month is None:
            return year
        if 1 <= int(month) <= 12 and (day is None or 1 <= int(day) <= calendar.monthrange(int(year), int(month))[1]):
            return f"{year}-{int(month):02d}" + ("" if day is None else f"-{int(day):02d}")
    raise FilterError(f"{shown}: give a year, month or day as 2019, 2019-06 or 2019-06-14")


def _place(value: str, shown: str) -> tuple[float, float]:
    match = _PLACE.fullmatch(value)
    if match:
        lat, lon = float(match.group(1)), float(match.group(2))
        if -90 <= lat <= 90 and -180 <= lon <= 180:
            return lat, lon
    raise FilterError(f"{shown}: give LAT,LON in degrees, e.g. 45.81,15.98 (south and west negative)")


def _distance(value: str, shown: str) -> float:
    match = _DISTANCE.fullmatch(value)
    if match:
        km = float(match.group(1)) * _UNITS[(match.group(2) or "km").lower()]
        if 0 < km <= 20_038 and math.isfinite(km):
            return km
    raise FilterError(f"{shown}: give a distance above 0 such as 20km, 500m or 3mi")


def cli_filters(*, after: str | None = None, before: str | None = None, camera: str | None = None,
                near: str | None = None, within: str | None = None, has_gps: bool = False, portrait: bool = False,
                landscape: bool = False, tags: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """The (key, value, shown) triples of `uclip query`'s filter options."""
    given = [(key, value, f"--{option} {value}") for key, option, value in (
        ("after", "after", after), ("before", "before", before), ("camera", "camera", camera), ("near", "near", near),
        ("within", "within", within)) if value is not None]
    given += [("gps", "1", "--has-gps")] if has_gps else []
    given += [("shape", shape, f"--{shape}") for shape, on in (("portrait", portrait), ("landscape", landscape)) if on]
    given += [("tag", tag, f"--tag {tag}") for tag in tags]
    return given


API_PARAMS = ("after", "before", "camera", "near", "within", "gps", "shape", "tag")


def api_filters(params) -> list[tuple[str, str, str]]:
    """The (key, value, shown) triples of an API request's filter parameters (gps=1, shape=portrait, ...)."""
    given = []
    for name in API_PARAMS:
        value = params.get(name, "")
        if not value.strip():
            continue
        if name == "gps":
            if value.strip().lower() not in ("1", "true", "yes"):
                raise FilterError(f"gps={value[:40]!r}: give gps=1 for photos with a position, or leave it out")
        given.append((name, value[:400], f"{name}={value[:80]}"))
    return given

"""The photos' metadata in the catalogue: capture time, camera, lens, orientation, pixel size, place (columns
of each record, catalogue.META_COLUMNS, read from the header the decode already parses: photo_meta.py),
and the masks that filters make of them.

A `PhotoDetails` view answers over one catalogue (a reader's snapshot or a writer's state). A filter
becomes a bool mask over the committed rows in one SQL query (a place: a bounding box in SQL, then the exact
great-circle distance in numpy), so a search applies it before its top-k: `-n 20` means 20 photos that pass,
on the exact and the approximate index alike. A catalogue written before metadata (no columns yet, until its
next writer; or records whose header was not read yet) passes no filter and says how many photos wait.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np

from .catalogue import META_COLUMNS, SQL_VARS, Catalogue, folder_prefix, in_groups, meta_values, prefix_range
from .photo_tags import PhotoTags
from .records import PhotoFilter, PhotoMeta

KM_PER_DEGREE = 111.195            # of latitude (and of longitude at the equator), on a 6,371 km sphere


class PhotoDetails:
    """The metadata of the photos one catalogue holds, and the filter masks made of it."""

    def __init__(self, catalogue: Catalogue, tags: PhotoTags | None = None):
        self.catalogue = catalogue
        self.tags = tags if tags is not None else PhotoTags(catalogue)   # a `tag:` condition asks them

    def filter_mask(self, photo_filter: PhotoFilter) -> np.ndarray:
        """Rows whose photo passes `photo_filter` (a bool mask over the committed rows): one query over the
        records' metadata; distances are then measured exactly on the rows inside each place's bounding box;
        tags (photo_tags.py) narrow it last. A catalogue without metadata yet (before the next `uclip index`)
        passes no metadata condition."""
        if not photo_filter.tags:
            return self._metadata_mask(photo_filter)
        tagged = self.tags.mask(photo_filter.tags)
        return tagged & self._metadata_mask(photo_filter) if photo_filter.on_metadata else tagged

    def _metadata_mask(self, photo_filter: PhotoFilter) -> np.ndarray:
        mask = np.zeros(self.catalogue.rows, dtype=bool)
        if not self.catalogue.described:
            return mask
        where, args = ["row IS NOT NULL", "row < ?", "taken_source IS NOT NULL"], [self.catalogue.rows]
        if photo_filter.after:
            where.append("taken >= ?")
            args.append(photo_filter.after)
        if photo_filter.before:
            where.append("taken < ?")
            args.append(photo_filter.before)
        if photo_filter.cameras:   # matched on the few distinct cameras, then selected by (make, model) in SQL
            cameras = [(make, model) for make, model in self.catalogue.connection.execute(
                "SELECT DISTINCT coalesce(make, ''), coalesce(model, '') FROM files").fetchall()
                if all(c.casefold() in f"{make} {model}".casefold() for c in photo_filter.cameras)]
            if not cameras:
                return mask
            where.append(f"(coalesce(make, ''), coalesce(model, '')) IN (VALUES {','.join(['(?, ?)'] * len(cameras))})")
            args += [value for pair in cameras for value in pair]
        if photo_filter.has_gps or photo_filter.near:
            where.append("lat IS NOT NULL AND lon IS NOT NULL")
        if photo_filter.shape:
            where.append("height > width" if photo_filter.shape == "portrait" else "width > height")
        for place in photo_filter.near:
            dlat = place.km / KM_PER_DEGREE
            dlon = place.km / (KM_PER_DEGREE * max(math.cos(math.radians(min(abs(place.lat) + dlat, 90.0))), 1e-9))
            where.append("lat BETWEEN ? AND ?")
            args += [place.lat - dlat, place.lat + dlat]
            if dlon < 180:    # a box across the antimeridian: the exact distance below decides
                low, high = place.lon - dlon, place.lon + dlon
                where.append("(lon BETWEEN ? AND ?" + (" OR lon <= ?" if high > 180 else "")
                             + (" OR lon >= ?" if low < -180 else "") + ")")
                args += [low, high] + ([high - 360] if high > 180 else []) + ([low + 360] if low < -180 else [])
        columns = "row, lat, lon" if photo_filter.near else "row"
        found = self.catalogue.connection.execute(f"SELECT {columns} FROM files WHERE {' AND '.join(where)}", args).fetchall()
        if not found:
            return mask
        values = np.array(found, dtype=np.float64)    # rows < 2**53: exact
        rows = values[:, 0].astype(np.int64)
        if photo_filter.near:
            keep = np.ones(len(rows), dtype=bool)
            for place in photo_filter.near:
                keep &= distance_km(values[:, 1], values[:, 2], place.lat, place.lon) <= place.km
            rows = rows[keep]
        mask[rows] = True
        return mask

    def missing_metadata(self, root: str | os.PathLike) -> set[str]:
        """Paths of the indexed ('ok') records inside `root` whose metadata has not been read yet."""
        if not self.catalogue.described:
            return set()
        low, high = prefix_range(folder_prefix(str(root)))
        return {path for (path,) in self.catalogue.connection.execute(
            "SELECT path FROM files WHERE path >= ? AND path < ? AND row IS NOT NULL AND taken_source IS NULL",
            (low, high))}

    def taken_of(self, rows: np.ndarray) -> np.ndarray:
        """The capture time of each row ("YYYY-MM-DDTHH:MM:SS", the earliest of its records; "" when unknown), as
        a str array: an IN query for a page of rows, one pass over every record for more (filters alone)."""
        rows = np.asarray(rows, dtype=np.int64)
        taken = np.full(len(rows), "", dtype="<U19")
        if not self.catalogue.described or not len(rows):
            return taken
        if len(rows) <= SQL_VARS:
            found = {row: t for marks, part in in_groups(rows.tolist()) for row, t in self.catalogue.connection.execute(
                f"SELECT row, MIN(taken) FROM files WHERE row IN ({marks}) AND taken_source IS NOT NULL GROUP BY row",
                part).fetchall()}
            taken[:] = [found.get(r, "") for r in rows.tolist()]
            return taken
        every = np.full(self.catalogue.rows, "", dtype="<U19")
        pairs = self.catalogue.connection.execute("SELECT row, MIN(taken) FROM files WHERE row IS NOT NULL AND row < ? AND "
                                   "taken_source IS NOT NULL GROUP BY row", (self.catalogue.rows,)).fetchall()
        if pairs:
            every[np.fromiter((r for r, _ in pairs), np.int64, len(pairs))] = [t for _, t in pairs]
        return every[rows]

    def undescribed(self) -> int:
        """How many indexed photos have no metadata yet (an older index, or shards imported): no filter passes them."""
        if not self.catalogue.described:
            return self.catalogue.connection.execute("SELECT COUNT(*) FROM files WHERE row IS NOT NULL").fetchone()[0]
        return self.catalogue.connection.execute("SELECT COUNT(*) FROM files WHERE row IS NOT NULL AND taken_source IS NULL").fetchone()[0]

    def commit_metadata(self, found: Sequence[tuple[str, int, int, PhotoMeta]]) -> int:
        """(path, size, mtime_ns, meta) of records read for their metadata alone, in one commit; a record whose
        file changed since (another size or mtime) is left as it is. Returns how many records took it."""
        with self.catalogue.transaction() as c:
            changed = 0
            for path, size, mtime_ns, meta in found:
                changed += c.execute(
                    f"UPDATE files SET {', '.join(f'{col} = ?' for col in META_COLUMNS)} "
                    "WHERE path = ? AND size = ? AND mtime_ns = ? AND row IS NOT NULL",
                    (*meta_values(meta), path, int(size), int(mtime_ns))).rowcount
        return changed

    def metadata_for_rows(self, rows: Iterable[int]) -> dict[int, PhotoMeta]:
        """row -> the metadata of the first record (by path) using it, for the rows that have it."""
        found: dict[int, PhotoMeta] = {}
        if not self.catalogue.described:
            return found
        for marks, part in in_groups(rows):
            for row, *values in self.catalogue.connection.execute(
                    f"SELECT row, {', '.join(META_COLUMNS)} FROM files WHERE row IN ({marks}) "
                    "AND taken_source IS NOT NULL ORDER BY path", part):
                found.setdefault(row, PhotoMeta(**dict(zip(META_COLUMNS, values))))
        return found


def distance_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Great-circle distances (haversine, a 6,371 km sphere) from (lat0, lon0), in km; degrees in."""
    p, p0 = np.radians(lat), math.radians(lat0)
    dp, dl = p - p0, np.radians(lon - lon0)
    h = np.sin(dp / 2) ** 2 + np.cos(p) * math.cos(p0) * np.sin(dl / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))

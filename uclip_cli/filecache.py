"""Folders in the user's cache dir derived from one source file, to make cold starts fast.

A derived folder (an optimised copy of an ONNX graph, a tokenizer's vocabulary as arrays) is keyed
by the source's resolved path, size, mtime and inode (as the bundle's checksum cache is) and by a
version string of whatever derives it, so a changed source or another library version never meets
a stale folder. It is built in a temporary folder, its files fsynced and their sizes recorded, then
renamed into place: readers see a whole folder or none. `ready()` catches a file damaged later in
its size; `ready(thorough=True)` also compares every file's sha256 with the one recorded at build
time, catching a same-size change (bit rot) too: commands whose output is stored (index, train) use
it, read-only queries the size check (see bundle.py for the same split over the bundle's own files).
Publishing a folder removes those derived from earlier versions of the same source, from sources
that no longer exist, and temporary folders left by crashed processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import cache_dir

RECORD = "source.json"
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class DerivedFolder:
    source: Path
    path: Path

    @classmethod
    def of(cls, kind: str, source: Path, version: str) -> "DerivedFolder":
        """The folder of `kind` for `source`; raises OSError when the source cannot be read."""
        source = Path(source).resolve()
        st = source.stat()
        state = f"{source}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{version}"
        return cls(source, cache_dir() / kind / f"{_short_hash(str(source))}-{_short_hash(state)}")

    def file(self, name: str) -> Path:
        return self.path / name

    def ready(self, thorough: bool = False) -> bool:
        try:
            record = json.loads((self.path / RECORD).read_text(encoding="utf-8"))
            sizes = record["sizes"]
            if not (sizes and all((self.path / n).stat().st_size == size for n, size in sizes.items())):
                return False
            if thorough:
                digests = record["sha256"]
                return set(digests) == set(sizes) and all(sha256_file(self.path / n) == d for n, d in digests.items())
            return True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def build(self, write: Callable[[Path], None]) -> bool:
        """Publish the folder that `write(tmp)` fills; False when that fails (no space, read-only cache...)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write(tmp)
            sizes, digests = {}, {}
            for file in sorted(tmp.iterdir()):
                fsync_path(file)
                sizes[file.name] = file.stat().st_size
                digests[file.name] = sha256_file(file)
            record = {"source": str(self.source), "sizes": sizes, "sha256": digests}
            (tmp / RECORD).write_text(json.dumps(record), encoding="utf-8")
            fsync_path(tmp / RECORD)
            os.rename(tmp, self.path)   # fails when another process published first: theirs serves as well
        except Exception:  # noqa: BLE001 - a cache that cannot be written only costs speed
            shutil.rmtree(tmp, ignore_errors=True)
            return self.ready()
        self._drop_stale()
        return True

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _drop_stale(self) -> None:
        for other in self.path.parent.iterdir():
            try:
                if other == self.path:
                    continue
                if other.name.startswith("."):
                    if time.time() - other.stat().st_mtime > STALE_TEMP_SECONDS:
                        shutil.rmtree(other, ignore_errors=True)
                    continue
                source = json.loads((other / RECORD).read_text(encoding="utf-8")).get("source")
            except (OSError, ValueError, AttributeError):
                source = None
            if source is None or source == str(self.source) or not Path(source).exists():
                shutil.rmtree(other, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks (bundle checksums, derived-file digests, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fsync_path(path: Path) -> None:
    """Make a file's data, or a folder's entries, durable (O_RDONLY is allowed on a folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Find the image files under one or more folders, deterministically and safely.

- Symlinked folders are followed; each real folder (identified by st_dev, st_ino) is walked once
  per call, so symlink loops terminate and a folder reachable twice is not listed twice.
- Paths keep the names the user sees: the root is resolved, the names below it are not.
- Hidden names (a leading ".") below a root are skipped unless `include_hidden`.
- Exclude globs match the path relative to the root (posix separators) or the bare name;
  "*" also crosses "/", so "raw/**" excludes everything under raw/, and "**/x" also matches a top-level x.
- A folder that cannot be listed, a file that vanishes and a broken symlink are recorded as
  warnings (a list the caller passes in) and skipped; the walk never stops on them.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UclipError

# The one list of image file name suffixes (lower case, as Path.suffix gives them) that every command uses:
# index, embed, eval, train and `uclip query IMAGE`. Listed whether or not a decoder is installed, so that a
# folder of iPhone photos without the `heif` extra reports each file as "HEIC support not installed" instead
# of silently ignoring it. It lives here, not in images.py, so that listing files never loads Pillow.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".heic", ".heif", ".avif",
})


def is_image_name(name: str) -> bool:
    """True when a file name ends in one of IMAGE_EXTENSIONS (any case)."""
    _, dot, ext = name.rpartition(".")
    return bool(dot) and f".{ext.lower()}" in IMAGE_EXTENSIONS


class WalkError(UclipError):
    """A root that cannot be walked; the message names it and what to do."""


@dataclass(frozen=True)
class FileEntry:
    path: Path       # absolute: resolved root + the names below it (symlinks in those names kept)
    root: Path       # the resolved root this file was found under
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WalkWarning:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def walk_images(
    roots: Iterable[str | os.PathLike],
    *,
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    warnings: list[WalkWarning] | None = None,
) -> Iterator[FileEntry]:
    """Yield every image file under `roots`, roots in the given order, names sorted within a folder.

    Roots are checked before the first file is yielded: a missing root or a root that is not a
    folder raises WalkError. Skipped folders and files are appended to `warnings` when given.
    """
    resolved = [_resolve_root(r) for r in roots]
    walker = _Walker(
        excludes=_expand_excludes(exclude),
        include_hidden=include_hidden,
        extensions=normalise_extensions(extensions),
        warnings=warnings if warnings is not None else [],
    )
    return walker.walk(resolved)


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """{"JPG", ".png"} -> {"jpg", "png"}."""
    return frozenset(e.lower().lstrip(".") for e in extensions)


def _resolve_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise WalkError(f"{path} does not exist: pass a folder of photos") from None
    except (OSError, RuntimeError) as e:
        raise WalkError(f"{path} cannot be resolved ({e}): pass a folder of photos") from None
    if not resolved.is_dir():
        raise WalkError(f"{path} is not a folder: pass the folder that holds it")
    if not _is_utf8(str(resolved)):
        raise WalkError(f"{path} is not valid UTF-8 and cannot be indexed: rename it")
    return resolved


def _expand_excludes(patterns: Iterable[str]) -> tuple[str, ...]:
    """Normalise user globs; "**/x" also matches a top-level "x" (as in .gitignore)."""
    expanded: list[str] = []
    for pattern in patterns:
        pattern = pattern.replace(os.sep, "/").strip()
        if not pattern:
            continue
        expanded.append(pattern)
        while pattern.startswith("**/"):
            pattern = pattern[3:]
            expanded.append(pattern)
    return tuple(expanded)


def _is_utf8(name: str) -> bool:
    """False for names that are not valid UTF-8 on disk (Python carries them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class _Walker:
    excludes: tuple[str, ...]
    include_hidden: bool
    extensions: frozenset[str]
    warnings: list[WalkWarning]

    def walk(self, roots: list[Path]) -> Iterator[FileEntry]:
        visited: set[tuple[int, int]] = set()
        for root in roots:
            yield from self._walk_dir(root, root, "", visited)

    def _walk_dir(self, root: Path, directory: Path, rel: str, visited: set[tuple[int, int]]) -> Iterator[FileEntry]:
        try:
            st = os.stat(directory)
        except OSError as e:
            self._warn(directory, f"cannot be read ({e.strerror or e}); skipped")
            return
        identity = (st.st_dev, st.st_ino)
        if identity in visited:
            return
        visited.add(identity)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self._warn(directory, f"cannot be listed ({e.strerror or e}); skipped")
            return
        for entry in entries:
            if entry.name.startswith(".") and not self.include_hidden:
                continue
            yield from self._visit(root, entry, f"{rel}/{entry.name}" if rel else entry.name, visited)

    def _visit(self, root: Path, entry: os.DirEntry, rel: str, visited: set[tuple[int, int]]) -> Iterator[FileEntry]:
        path = Path(entry.path)
        try:
            st = entry.stat()  # follows symlinks
        except FileNotFoundError:
            if entry.is_symlink():
                self._warn(path, "broken symlink; skipped")
            return  # otherwise it vanished since the listing
        except OSError as e:
            self._warn(path, f"cannot be read ({e.strerror or e}); skipped")
            return
        if stat.S_ISDIR(st.st_mode):
            if not self._excluded(rel, entry.name, is_dir=True) and self._storable(path):
                yield from self._walk_dir(root, path, rel, visited)
        elif stat.S_ISREG(st.st_mode) and self._is_image_name(entry.name):
            if not self._excluded(rel, entry.name, is_dir=False) and self._storable(path):
                yield FileEntry(path=path, root=root, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def _storable(self, path: Path) -> bool:
        """Names that are not valid UTF-8 on disk cannot be stored in the index as text."""
        if _is_utf8(path.name):
            return True
        self._warn(path, "name is not valid UTF-8 and cannot be indexed; rename it")
        return False

    def _is_image_name(self, name: str) -> bool:
        _, dot, ext = name.rpartition(".")
        return bool(dot) and ext.lower() in self.extensions

    def _excluded(self, rel: str, name: str, *, is_dir: bool) -> bool:
        candidates = (rel, name, rel + "/") if is_dir else (rel, name)
        return any(fnmatchcase(c, p) for p in self.excludes for c in candidates)

    def _warn(self, path: Path, reason: str) -> None:
        self.warnings.append(WalkWarning(path, reason))

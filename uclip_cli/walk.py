"""Find the image files under one or more folders, deterministically and safely.

- A symlinked folder is followed only while it points inside the folders being indexed (then it adds
  no file the walk would not find anyway) or when the caller asks (`follow_links`): a link to `/` in a
  photo folder must not walk the whole filesystem. Each real folder (identified by st_dev, st_ino) is
  walked once per call, so symlink loops terminate and a folder reachable twice is not listed twice.
- Virtual filesystems (/proc, /sys, /dev and mounts of their kinds) are never walked: as a root they
  are refused, below a root they are skipped with a warning.
- An image-named entry that is not a regular file (a FIFO, a device, a socket) or a broken symlink is
  yielded with `skip` set to the reason, so that it is reported like any file that could not be
  indexed (report.json), and is never opened for reading (a FIFO would block).
- Paths keep the names the user sees: the root is resolved, the names below it are not.
- Hidden names (a leading ".") below a root are skipped unless `include_hidden`.
- Exclude globs read as in .gitignore (`uclip index --help` says it to the user): a pattern without a slash
  matches a name at any depth ("*.gif", "raw"); one with a slash matches the path from the indexed
  folder ("raw/*", "/raw/*"), where a leading "*/" or "**/" may also match nothing, so "*/raw/*" takes
  raw/ right under the folder as well as deeper ones; a trailing "/" matches folders only; "*" also
  crosses "/"; an absolute pattern ("/home/me/photos/raw/*", "~/photos/raw") matches the absolute path,
  its fixed leading folders resolved as the indexed folder is. An excluded folder is not entered.
- A folder that cannot be listed, a file that vanishes and a broken symlink without an image name
  (perhaps a folder on an unmounted drive) are recorded as warnings (a list the caller passes in) and
  skipped; the walk never stops on them.
"""
from __future__ import annotations

import functools
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
    skip: str | None = None   # why this image-named entry cannot be read (not a regular file, broken link)


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
    follow_links: bool = False,
    indexed_roots: Iterable[str | os.PathLike] = (),
) -> Iterator[FileEntry]:
    """Yield every image file under `roots`, roots in the given order, names sorted within a folder.

    Roots are checked before the first file is yielded: an empty path, a missing root, a root that is
    not a folder or one on a virtual filesystem raises WalkError. Skipped folders and files are
    appended to `warnings` when given. A symlinked folder is followed when it points inside `roots`,
    or with `follow_links`; one pointing inside `indexed_roots` (other folders of the same index,
    walked on their own) is left to that walk.
    """
    resolved = [resolve_root(r) for r in roots]
    walker = _Walker(
        excludes=_expand_excludes(exclude),
        include_hidden=include_hidden,
        extensions=normalise_extensions(extensions),
        warnings=warnings if warnings is not None else [],
        follow_links=follow_links,
        inside=tuple(resolved),
        elsewhere=tuple(Path(r).resolve() for r in indexed_roots),
    )
    return walker.walk(resolved)


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """{"JPG", ".png"} -> {"jpg", "png"}."""
    return frozenset(e.lower().lstrip(".") for e in extensions)


def resolve_root(root: str | os.PathLike) -> Path:
    """The resolved folder to walk, or WalkError saying why it cannot be one (empty, missing, a file, virtual)."""
    if not str(root).strip() and not isinstance(root, Path):
        raise WalkError("an empty path was given as a folder: give the folder of photos (use . for this folder)")
    path = Path(root).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise WalkError(f"{path} does not exist: pass a folder of photos") from None
    except (OSError, RuntimeError) as e:
        raise WalkError(f"{path} cannot be resolved ({e}): pass a folder of photos") from None
    if not resolved.is_dir():
        raise WalkError(f"{path} is not a folder: pass the folder that holds it")
    kind = virtual_filesystem(resolved)
    if kind:
        raise WalkError(f"{path} is on a virtual filesystem ({kind}), not a folder of photos: pass a photo folder")
    if not _is_utf8(str(resolved)):
        raise WalkError(f"{path} is not valid UTF-8 and cannot be indexed: rename it")
    return resolved


@dataclass(frozen=True)
class _Exclude:
    """One --exclude pattern, classified as .gitignore does."""

    glob: str
    name_only: bool     # no slash but a trailing one: matches a name at any depth
    dirs_only: bool     # a trailing slash
    absolute: bool      # matches the absolute path too

    def matches(self, rel: str, path: Path, is_dir: bool) -> bool:
        if self.dirs_only and not is_dir:
            return False
        if self.name_only:
            return fnmatchcase(path.name, self.glob)
        candidates = [rel, "/" + rel] + ([path.as_posix()] if self.absolute else [])
        if is_dir:   # "raw/**" or "raw/*" leaves nothing in raw/: it is not entered at all
            candidates += [c + "/" for c in candidates]
        return any(fnmatchcase(c, self.glob) for c in candidates)


def _expand_excludes(patterns: Iterable[str]) -> tuple[_Exclude, ...]:
    """Classify user globs; "~" expanded, absolute ones resolved up to their first wildcard, and "a/**/b"
    also read as "a/b" (as in .gitignore: "**/" may match no folder)."""
    expanded: list[_Exclude] = []
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            continue
        if pattern.startswith("~"):
            pattern = os.path.expanduser(pattern)
        pattern = pattern.replace(os.sep, "/")
        absolute = os.path.isabs(pattern) and len(pattern) > 1
        if absolute:
            pattern = _resolve_fixed_part(pattern)
        dirs_only = pattern.endswith("/") and len(pattern) > 1
        glob = pattern.rstrip("/") if dirs_only else pattern
        variants = [glob]
        for v in variants:   # grows while it is read: every way of letting a "**/" match no folder
            shorter = [v[3:]] if v.startswith("**/") else []
            shorter += [v[:i] + v[i + 3:] for i in range(len(v)) if v.startswith("/**/", i)]
            variants += [w for w in shorter if w and w not in variants]
        expanded += [_Exclude(v, name_only="/" not in v, dirs_only=dirs_only, absolute=absolute) for v in variants]
    return tuple(expanded)


def _resolve_fixed_part(pattern: str) -> str:
    """'/home/me/Pictures/raw/*' with Pictures a symlink -> '/data/pics/raw/*': as the walk names the files."""
    parts = pattern.rstrip("/").split("/")
    fixed = 0
    while fixed < len(parts) and not any(c in parts[fixed] for c in "*?["):
        fixed += 1
    head = "/".join(parts[:fixed]) or "/"
    if not os.path.exists(head):
        return pattern
    resolved = os.path.realpath(head).replace(os.sep, "/")
    tail = "/".join(parts[fixed:])
    return (resolved.rstrip("/") + ("/" + tail if tail else "")) + ("/" if pattern.endswith("/") else "")


def _is_utf8(name: str) -> bool:
    """False for names that are not valid UTF-8 on disk (Python carries them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Kernel filesystems that hold no photos and can be endless or hang a reader (/proc/kcore, /dev/zero,
# /sys files that block): never walked.
VIRTUAL_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs",
})
VIRTUAL_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))   # also where /proc/self/mountinfo cannot be read


@functools.cache
def _virtual_devices() -> dict[int, str]:
    """st_dev -> filesystem type of every mount of a virtual kind (Linux: /proc/self/mountinfo)."""
    devices: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "-" not in fields:
                    continue
                fstype = fields[fields.index("-") + 1]
                if fstype in VIRTUAL_FILESYSTEMS:
                    major, minor = fields[2].split(":")
                    devices[os.makedev(int(major), int(minor))] = fstype
    except (OSError, ValueError, IndexError):
        pass
    return devices


def virtual_filesystem(path: Path, st_dev: int | None = None) -> str | None:
    """The kind of virtual filesystem a resolved folder is on ("proc", ...), or None for a real one."""
    if st_dev is None:
        try:
            st_dev = os.stat(path).st_dev
        except OSError:
            st_dev = None
    if st_dev is not None and st_dev in _virtual_devices():
        return _virtual_devices()[st_dev]
    for tree in VIRTUAL_TREES:
        if path == tree or path.is_relative_to(tree):
            return str(tree)
    return None


@dataclass
class _Walker:
    excludes: tuple[_Exclude, ...]
    include_hidden: bool
    extensions: frozenset[str]
    warnings: list[WalkWarning]
    follow_links: bool = False
    inside: tuple[Path, ...] = ()
    elsewhere: tuple[Path, ...] = ()

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
        if directory != root:
            kind = virtual_filesystem(Path(os.path.realpath(directory)), st.st_dev)
            if kind:
                self._warn(directory, f"on a virtual filesystem ({kind}); skipped")
                return
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
            if not entry.is_symlink():
                return  # it vanished since the listing
            if self._is_image_name(entry.name):
                if not self._excluded(rel, path, is_dir=False) and self._storable(path):
                    yield self._special(root, path, f"broken symbolic link (to {_link_target(path)})")
            else:
                self._warn(path, f"broken symlink (to {_link_target(path)}); skipped")
            return
        except OSError as e:
            self._warn(path, f"cannot be read ({e.strerror or e}); skipped")
            return
        if stat.S_ISDIR(st.st_mode):
            if not self._excluded(rel, path, is_dir=True) and self._storable(path) and self._follow(path, entry):
                yield from self._walk_dir(root, path, rel, visited)
        elif self._is_image_name(entry.name) and not self._excluded(rel, path, is_dir=False) and self._storable(path):
            if stat.S_ISREG(st.st_mode):
                yield FileEntry(path=path, root=root, size=st.st_size, mtime_ns=st.st_mtime_ns)
            else:
                yield self._special(root, path, f"unreadable: is {file_type(st.st_mode)}, not a regular file")

    def _follow(self, path: Path, entry: os.DirEntry) -> bool:
        """A real folder, or a symlinked one inside the roots of this walk (or any, with follow_links)."""
        if not entry.is_symlink():
            return True
        target = Path(os.path.realpath(path))
        if any(target.is_relative_to(r) for r in self.inside):
            return True
        if any(target.is_relative_to(r) for r in self.elsewhere):
            return False   # another folder of the index: its own walk lists it
        if self.follow_links:
            return True
        self._warn(path, f"symlink to a folder outside the indexed folders ({target}); not followed "
                         "(pass --follow-links to follow it)")
        return False

    @staticmethod
    def _special(root: Path, path: Path, reason: str) -> FileEntry:
        try:
            st = os.lstat(path)
            size, mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime_ns = 0, 0
        return FileEntry(path=path, root=root, size=size, mtime_ns=mtime_ns, skip=reason)

    def _storable(self, path: Path) -> bool:
        """Names that are not valid UTF-8 on disk cannot be stored in the index as text."""
        if _is_utf8(path.name):
            return True
        self._warn(path, "name is not valid UTF-8 and cannot be indexed; rename it")
        return False

    def _is_image_name(self, name: str) -> bool:
        _, dot, ext = name.rpartition(".")
        return bool(dot) and ext.lower() in self.extensions

    def _excluded(self, rel: str, path: Path, *, is_dir: bool) -> bool:
        return any(e.matches(rel, path, is_dir) for e in self.excludes)

    def _warn(self, path: Path, reason: str) -> None:
        self.warnings.append(WalkWarning(path, reason))


def file_type(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a stat mode."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"

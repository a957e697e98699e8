"""walk_images: what gets indexed, in which order, and what never stops a walk."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from uclip_cli import walk as walk_module
from uclip_cli.walk import FileEntry, WalkError, WalkWarning, walk_images


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rel_paths(entries, root: Path) -> list[str]:
    return [e.path.relative_to(root.resolve()).as_posix() for e in entries]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    touch(root / "b.jpg", b"12345")
    touch(root / "a.PNG")
    touch(root / "notes.txt")
    touch(root / "noext")
    touch(root / "2020" / "summer" / "beach.jpeg")
    touch(root / "2020" / "čaj" / "mačka na kauču.webp")
    touch(root / "日本" / "写真.HEIC")
    touch(root / ".hidden.jpg")
    touch(root / ".cache" / "thumb.jpg")
    touch(root / "raw" / "dsc001.tif")
    touch(root / "raw" / "deep" / "dsc002.tiff")
    touch(root / "edits" / "beach_thumb.jpg")
    return root


def test_nested_unicode_case_insensitive_sorted(tree: Path):
    entries = list(walk_images([tree]))
    assert rel_paths(entries, tree) == [
        "2020/summer/beach.jpeg",
        "2020/čaj/mačka na kauču.webp",
        "a.PNG",
        "b.jpg",
        "edits/beach_thumb.jpg",
        "raw/deep/dsc002.tiff",
        "raw/dsc001.tif",
        "日本/写真.HEIC",
    ]
    b = next(e for e in entries if e.path.name == "b.jpg")
    st = (tree / "b.jpg").stat()
    assert b == FileEntry(path=tree.resolve() / "b.jpg", root=tree.resolve(), size=5, mtime_ns=st.st_mtime_ns)
    assert all(e.path.is_absolute() and e.root == tree.resolve() for e in entries)
    assert list(walk_images([tree])) == entries  # deterministic


def test_hidden_files_and_folders_only_when_asked(tree: Path):
    hidden = {".hidden.jpg", ".cache/thumb.jpg"}
    assert not hidden & set(rel_paths(walk_images([tree]), tree))
    assert hidden <= set(rel_paths(walk_images([tree], include_hidden=True), tree))


def test_hidden_root_itself_is_walked(tmp_path: Path):
    touch(tmp_path / ".photos" / "a.jpg")
    assert rel_paths(walk_images([tmp_path / ".photos"]), tmp_path / ".photos") == ["a.jpg"]


def test_exclude_globs_on_relative_path_and_name(tree: Path):
    found = rel_paths(walk_images([tree], exclude=["raw/**", "*_thumb.jpg", "**/summer"]), tree)
    assert found == ["2020/čaj/mačka na kauču.webp", "a.PNG", "b.jpg", "日本/写真.HEIC"]
    nested = rel_paths(walk_images([tree], exclude=["**/deep/**"]), tree)
    assert "raw/deep/dsc002.tiff" not in nested and "raw/dsc001.tif" in nested


def gitignore_tree(root: Path) -> Path:
    for rel in ("raw/a.jpg", "trip/raw/b.jpg", "trip/day/raw/c.jpg", "trip/rawness/d.jpg", "keep.jpg", "raw.jpg",
                "trip/e.gif"):
        touch(root / rel)
    return root


def test_exclude_star_raw_star_takes_raw_right_under_the_folder_too(tmp_path: Path):
    """Issue 7, 3.6: the help's own example '*/raw/*' left raw/ directly under the indexed folder in."""
    root = gitignore_tree(tmp_path / "photos")
    found = rel_paths(walk_images([root], exclude=["*/raw/*"]), root)
    assert sorted(found) == ["keep.jpg", "raw.jpg", "trip/e.gif", "trip/rawness/d.jpg"]


@pytest.mark.parametrize("pattern,left", [
    ("raw", ["keep.jpg", "raw.jpg", "trip/e.gif", "trip/rawness/d.jpg"]),          # no slash: a name at any depth
    ("raw/", ["keep.jpg", "raw.jpg", "trip/e.gif", "trip/rawness/d.jpg"]),         # folders only
    ("*.gif", ["keep.jpg", "raw.jpg", "raw/a.jpg", "trip/day/raw/c.jpg", "trip/raw/b.jpg", "trip/rawness/d.jpg"]),
    ("raw/*", ["keep.jpg", "raw.jpg", "trip/day/raw/c.jpg", "trip/e.gif", "trip/raw/b.jpg", "trip/rawness/d.jpg"]),
    ("/raw/*", ["keep.jpg", "raw.jpg", "trip/day/raw/c.jpg", "trip/e.gif", "trip/raw/b.jpg", "trip/rawness/d.jpg"]),
    ("trip/*/raw", ["keep.jpg", "raw.jpg", "raw/a.jpg", "trip/e.gif", "trip/raw/b.jpg", "trip/rawness/d.jpg"]),
    ("**/raw/**", ["keep.jpg", "raw.jpg", "trip/e.gif", "trip/rawness/d.jpg"]),
])
def test_exclude_patterns_read_as_gitignore_does(tmp_path: Path, pattern, left):
    root = gitignore_tree(tmp_path / "photos")
    assert sorted(rel_paths(walk_images([root], exclude=[pattern]), root)) == left


def test_exclude_absolute_paths_match_even_through_a_symlinked_folder(tmp_path: Path, monkeypatch):
    """Issue 7, 3.6: an absolute-path glob silently excluded nothing."""
    root = gitignore_tree(tmp_path / "photos")
    link = tmp_path / "link"
    os.symlink(root, link)
    everything = ["keep.jpg", "raw.jpg", "raw/a.jpg", "trip/day/raw/c.jpg", "trip/e.gif", "trip/raw/b.jpg",
                  "trip/rawness/d.jpg"]
    for pattern, gone in ((f"{root}/raw/*", {"raw/a.jpg"}), (f"{link}/raw", {"raw/a.jpg"}),
                          (f"{link}/trip/**/raw/", {"trip/raw/b.jpg", "trip/day/raw/c.jpg"})):
        found = sorted(rel_paths(walk_images([link], exclude=[pattern]), root))
        assert found == [p for p in everything if p not in gone], pattern
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "raw/a.jpg" not in rel_paths(walk_images([root], exclude=["~/photos/raw"]), root)


def test_a_relative_pattern_never_matches_above_the_indexed_folder(tmp_path: Path):
    root = gitignore_tree(tmp_path / "raw" / "photos")   # the folder itself lies under a folder named raw
    assert len(rel_paths(walk_images([root], exclude=["*/raw/*"]), root)) == 4
    assert len(rel_paths(walk_images([root], exclude=["raw"]), root)) == 4


def test_excluded_folder_is_not_entered(tree: Path, monkeypatch):
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(walk_module.os, "scandir", lambda p: listed.append(Path(p).name) or real_scandir(p))
    list(walk_images([tree], exclude=["raw/**"]))
    assert "raw" not in listed and "deep" not in listed


def test_extensions_parameter(tree: Path):
    found = rel_paths(walk_images([tree], extensions={".TIF", "jpeg"}), tree)
    assert found == ["2020/summer/beach.jpeg", "raw/dsc001.tif"]


def test_symlink_loop_terminates_and_each_file_once(tmp_path: Path):
    root = tmp_path / "photos"
    touch(root / "a" / "x.jpg")
    os.symlink("..", root / "a" / "up")             # a/up -> photos (a loop)
    os.symlink(root / "a", root / "b")               # b -> a: same real folder twice
    os.symlink(root, root / "a" / "self_abs")        # absolute loop
    found = rel_paths(walk_images([root]), root)
    assert found == ["a/x.jpg"]


def test_symlinked_folder_outside_the_roots_is_followed_only_when_asked(tmp_path: Path):
    outside = tmp_path / "elsewhere"
    touch(outside / "y.jpg")
    root = tmp_path / "photos"
    touch(root / "albums" / "a.jpg")
    os.symlink(outside, root / "linked")
    os.symlink(root / "albums", root / "0_inside")          # inside the root: followed (each file once)
    os.symlink(outside / "y.jpg", root / "z.jpg")            # a symlinked file is read through its link
    warnings: list[WalkWarning] = []
    entries = list(walk_images([root], warnings=warnings))
    assert [e.path for e in entries] == [root.resolve() / "0_inside" / "a.jpg", root.resolve() / "z.jpg"]
    assert [(w.path.name, "--follow-links" in w.reason) for w in warnings] == [("linked", True)]

    followed = list(walk_images([root], follow_links=True))
    assert [e.path for e in followed] == [root.resolve() / "0_inside" / "a.jpg", root.resolve() / "linked" / "y.jpg",
                                          root.resolve() / "z.jpg"]


def test_a_link_to_the_filesystem_root_is_not_walked(tmp_path: Path):
    """A symlink to / inside a photo folder once walked the whole filesystem."""
    touch(tmp_path / "photos" / "a.jpg")
    os.symlink("/", tmp_path / "photos" / "everything")
    warnings: list[WalkWarning] = []
    assert rel_paths(walk_images([tmp_path / "photos"], warnings=warnings), tmp_path / "photos") == ["a.jpg"]
    assert [w.path.name for w in warnings] == ["everything"]


def test_a_link_into_another_indexed_folder_is_left_to_that_folder(tmp_path: Path):
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "b" / "y.jpg")
    os.symlink(tmp_path / "b", tmp_path / "a" / "to_b")
    warnings: list[WalkWarning] = []
    found = [e.path.name for e in walk_images([tmp_path / "a"], warnings=warnings, indexed_roots=[tmp_path / "b"])]
    assert found == ["x.jpg"] and warnings == []


def test_virtual_filesystems_are_refused_as_roots_and_skipped_below(tmp_path: Path):
    for virtual in ("/proc/self", "/sys", "/dev"):
        with pytest.raises(WalkError, match="virtual filesystem"):
            walk_images([virtual])
    touch(tmp_path / "a.jpg")
    os.symlink("/proc", tmp_path / "proc_link")
    warnings: list[WalkWarning] = []
    assert rel_paths(walk_images([tmp_path], warnings=warnings, follow_links=True), tmp_path) == ["a.jpg"]
    assert [(w.path.name, "virtual filesystem" in w.reason) for w in warnings] == [("proc_link", True)]


def test_empty_path_is_refused():
    """`uclip index ""` once indexed the current folder."""
    with pytest.raises(WalkError, match="empty path"):
        walk_images([""])


def test_special_files_and_broken_links_with_image_names_come_with_a_reason(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.png")
    os.symlink(tmp_path / "gone", tmp_path / "dangling_folder")
    os.mkfifo(tmp_path / "pipe.txt")
    warnings: list[WalkWarning] = []
    entries = {e.path.name: e.skip for e in walk_images([tmp_path], warnings=warnings)}
    assert entries.keys() == {"a.jpg", "pipe.jpg", "zero.jpg", "dangling.png"}
    assert entries["a.jpg"] is None
    assert "FIFO" in entries["pipe.jpg"] and "character device" in entries["zero.jpg"]
    assert "broken symbolic link" in entries["dangling.png"] and "gone.jpg" in entries["dangling.png"]
    assert [w.path.name for w in warnings] == ["dangling_folder"]   # perhaps a folder on an unmounted drive


def test_root_given_through_a_symlink_is_resolved(tmp_path: Path):
    touch(tmp_path / "real" / "a.jpg")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    (entry,) = walk_images([tmp_path / "alias"])
    assert entry.root == (tmp_path / "real").resolve()
    assert entry.path == (tmp_path / "real").resolve() / "a.jpg"


def test_overlapping_roots_list_each_file_once(tree: Path):
    entries = list(walk_images([tree, tree / "2020", tree]))
    assert len(entries) == len({e.path for e in entries}) == 8


def test_broken_symlink_without_image_name_and_unlistable_folder_are_warnings(tree: Path, monkeypatch):
    os.symlink(tree / "missing", tree / "dangling")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "2020":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    # Simulated: the tests run as root, for whom chmod does not block reading (see the test below).
    monkeypatch.setattr(walk_module.os, "scandir", scandir)
    warnings: list[WalkWarning] = []
    found = rel_paths(walk_images([tree], warnings=warnings), tree)
    assert "a.PNG" in found and "raw/dsc001.tif" in found
    assert not any(p.startswith("2020/") for p in found)
    reasons = {w.path.name: w.reason for w in warnings}
    assert "Permission denied" in reasons["2020"] and "broken symlink" in reasons["dangling"]


def test_really_unreadable_folder_is_skipped():
    """A folder without read permission, walked by a user who lacks it (root forks an unprivileged child)."""
    root = Path(tempfile.mkdtemp(prefix="uclip-walk-"))
    try:
        root.chmod(0o755)
        touch(root / "ok" / "a.jpg")
        touch(root / "secret" / "b.jpg")
        for d in (root / "ok", root / "secret"):
            d.chmod(0o755)
        (root / "secret").chmod(0o000)
        found, warnings = _walk_as_unprivileged_user(root)
        assert found == ["ok/a.jpg"]
        assert warnings == ["secret"]
    finally:
        (root / "secret").chmod(0o755)
        shutil.rmtree(root)


def _walk_as_unprivileged_user(root: Path) -> tuple[list[str], list[str]]:
    if os.geteuid() != 0:
        warnings: list[WalkWarning] = []
        return rel_paths(walk_images([root], warnings=warnings), root), [w.path.name for w in warnings]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, walk, report through the pipe
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            warnings = []
            found = rel_paths(walk_images([root], warnings=warnings), root)
            report = {"found": found, "warnings": [w.path.name for w in warnings]}
        except BaseException as e:
            report = {"error": repr(e)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "error" not in report, report["error"]
    return report["found"], report["warnings"]


def test_name_that_is_not_utf8_is_skipped_with_a_warning(tmp_path: Path):
    touch(tmp_path / "good.jpg")
    with open(os.fsencode(tmp_path) + b"/bad\xff.jpg", "wb") as f:
        f.write(b"x")
    warnings: list[WalkWarning] = []
    assert rel_paths(walk_images([tmp_path], warnings=warnings), tmp_path) == ["good.jpg"]
    assert len(warnings) == 1 and "UTF-8" in warnings[0].reason


def test_missing_root_and_file_root_are_refused_before_walking(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    with pytest.raises(WalkError, match="does not exist"):
        walk_images([tmp_path, tmp_path / "nope"])
    with pytest.raises(WalkError, match="is not a folder"):
        walk_images([tmp_path / "a.jpg"])

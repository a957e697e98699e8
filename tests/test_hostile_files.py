"""Hostile files (issue 10 items 1, 2, 4, 15, 16): none of them crashes, hangs or misleads `uclip index`/`query`.

Each test reproduces what the issue saw: a 20 GB sparse "big.jpg", a link to /dev/zero, a FIFO
(before the walk, and swapped in between walk and read), `uclip index ""`, /proc as a root, a link
to / in a photo folder, a file fixed with chmod, escape codes and newlines in file names.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import index_records, invoke_uclip, parse_summary, read_report, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli import bundle as B
from uclip_cli.images import ImageDecodeError, byte_cap, read_image_bytes
from uclip_cli.image_pipeline import Preparer
from uclip_cli.walk import walk_images


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"good{i}.jpg").write_bytes(jpeg_bytes(photo_like(64, 48, seed=i)))
    return folder


@pytest.fixture
def env(tmp_path, tiny_bundle) -> dict[str, str]:
    return uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")


def index_run(env: dict, *args, timeout: float = 60):
    """`uclip index` in its own process, with a timeout: a hang fails the test instead of stalling the suite."""
    return run_uclip(["index", "--no-progress", "--batch-size", "4", *args], env, timeout=timeout)


# ---------------------------------------------------------------------------- 1: huge files


def test_a_20_gb_sparse_file_is_skipped_with_a_reason_and_the_rest_indexed(photos, env, tmp_path):
    big = photos / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff\xe0")
    os.truncate(big, 20 * 2**30)           # sparse: no disk space, but 20 GB to read
    started = time.monotonic()
    result = index_run(env, photos).ok()
    assert time.monotonic() - started < 60
    counts = parse_summary(result.stdout)
    assert (counts["embedded"], counts["skipped"]) == (2, 1)
    reason = read_report(tmp_path / "index")[str(big)]
    assert "too large" in reason and "21.47 GB" in reason
    assert parse_summary(index_run(env, photos).ok().stdout)["unchanged"] == 3   # recorded: not retried until it changes


def test_reading_stops_at_the_cap_even_when_the_size_says_nothing():
    """/proc files report size 0 and stream on: the cap, not the size, ends the read."""
    with pytest.raises(ImageDecodeError) as caught:
        read_image_bytes("/proc/self/maps", max_bytes=64)
    assert caught.value.kind == "too_large" and "still growing" in caught.value.reason


def test_byte_cap_follows_the_pixel_cap_and_the_format():
    assert byte_cap("JPEG", 1000) < byte_cap("PNG", 1000) < byte_cap("JPEG", 10**8)
    assert byte_cap(None, 1000) == byte_cap("TIFF", 1000)   # an unknown signature gets the largest
    assert byte_cap("JPEG") < 2 * 10**9                     # a 20 GB file never fits


def test_a_link_to_dev_zero_is_reported_not_read(photos, env, tmp_path):
    os.symlink("/dev/zero", photos / "zero.jpg")
    counts = parse_summary(index_run(env, photos).ok().stdout)
    assert (counts["embedded"], counts["skipped"]) == (2, 1)
    assert "character device" in read_report(tmp_path / "index")[str(photos / "zero.jpg")]


# ---------------------------------------------------------------------------- 2 and 15: FIFOs, swaps, broken links


def test_fifo_and_broken_link_with_image_names_are_reported_with_reasons(photos, env, tmp_path):
    os.mkfifo(photos / "pipe.jpg")
    os.symlink(photos / "deleted.jpg", photos / "dangling.jpg")
    counts = parse_summary(index_run(env, photos).ok().stdout)
    assert (counts["embedded"], counts["skipped"]) == (2, 2)
    report = read_report(tmp_path / "index")
    assert "FIFO" in report[str(photos / "pipe.jpg")]
    assert "broken symbolic link" in report[str(photos / "dangling.jpg")]


@pytest.mark.parametrize("swap", ["fifo", "dev_zero", "folder"])
def test_a_file_swapped_between_walk_and_read_is_refused_at_once(photos, tiny_bundle, swap):
    (entry,) = [e for e in walk_images([photos]) if e.path.name == "good0.jpg"]
    entry.path.unlink()
    if swap == "fifo":
        os.mkfifo(entry.path)                 # a plain open() would wait forever for a writer
    elif swap == "dev_zero":
        os.symlink("/dev/zero", entry.path)   # a plain read() would fill memory
    else:
        entry.path.mkdir()
    started = time.monotonic()
    item = Preparer(B.load_bundle(tiny_bundle).image)(entry)
    assert time.monotonic() - started < 5
    assert item.status == "failed"
    assert {"fifo": "FIFO", "dev_zero": "character device", "folder": "directory"}[swap] in item.error


# ---------------------------------------------------------------------------- 4: paths that walk the system


def test_an_empty_path_is_refused_and_nothing_is_indexed(photos, env, tmp_path):
    result = run_uclip(["index", "", "--no-progress"], env, cwd=photos)
    assert "empty path" in result.one_line_error()
    assert not (tmp_path / "index").exists()


def test_proc_is_refused_as_a_folder_to_index(env, tmp_path):
    assert "virtual filesystem" in run_uclip(["index", "/proc/self", "--no-progress"], env).one_line_error()
    assert not (tmp_path / "index").exists()


def test_a_link_to_slash_in_a_photo_folder_is_not_followed(photos, env, tmp_path):
    os.symlink("/", photos / "everything")
    result = index_run(env, photos, timeout=60).ok()
    assert parse_summary(result.stdout)["seen"] == 2
    assert "--follow-links" in result.stdout + result.stderr
    assert set(index_records(tmp_path / "index")) == {str(photos / "good0.jpg"), str(photos / "good1.jpg")}


def test_follow_links_indexes_a_linked_folder_outside(photos, env, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(jpeg_bytes(photo_like(64, 48, seed=7)))
    os.symlink(outside, photos / "linked")
    assert parse_summary(index_run(env, photos).ok().stdout)["seen"] == 2
    assert parse_summary(index_run(env, photos, "--follow-links").ok().stdout)["embedded"] == 1
    assert str(photos / "linked" / "far.jpg") in index_records(tmp_path / "index")


# ---------------------------------------------------------------------------- 15: chmod is retried


def test_a_file_fixed_with_chmod_is_retried(tmp_path, tiny_bundle):
    """Unreadable, then made readable: chmod changes neither size nor mtime, and the file is indexed.

    Root reads every file whatever its mode, so under root the runs drop the capabilities that let it
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) with util-linux's setpriv.
    """
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(photo_like(64, 48, seed=i)))
    locked = photos / "p1.jpg"
    locked.chmod(0o000)
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")

    first = parse_summary(_index_without_privileges(env, photos))
    assert (first["embedded"], first["skipped"]) == (1, 1)
    assert read_report(tmp_path / "index")[str(locked)] == "unreadable: permission denied"
    again = parse_summary(_index_without_privileges(env, photos))
    assert (again["unchanged"], again["skipped"]) == (2, 0)   # still unreadable: not retried
    locked.chmod(0o644)
    fixed = parse_summary(_index_without_privileges(env, photos))
    assert (fixed["embedded"], fixed["skipped"], fixed["skipped_in_all"]) == (1, 0, 0)


def _index_without_privileges(env: dict, photos: Path) -> str:
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, who reads files whatever their mode, and util-linux's setpriv "
                        "(to drop that privilege) is not installed")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]
    done = subprocess.run([*prefix, sys.executable, "-m", "uclip_cli.cli", "index", str(photos), "--no-progress"],
                          env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


# ---------------------------------------------------------------------------- 16: names with control characters


def test_names_with_escape_codes_and_newlines_print_as_real_paths(tmp_path, env):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["plain.jpg", "esc\x1b[31mred.jpg", "two\nlines.jpg"]
    for i, name in enumerate(names):
        (photos / name).write_bytes(jpeg_bytes(photo_like(64, 48, seed=i)))
    index_run(env, photos).ok()
    real = {str(photos / n) for n in names}

    nul = run_uclip(["query", "a photo", "-n", "10", "-0"], env).ok().stdout
    assert nul.endswith("\0") and set(nul[:-1].split("\0")) == real      # exact, NUL-separated

    lines = run_uclip(["query", "a photo", "-n", "10", "--format", "paths"], env).ok().stdout.splitlines()
    assert len(lines) == 3 and "\x1b" not in "".join(lines)               # a newline in a name does not split it
    for line in lines:                                                    # what is printed names the real file
        shown = subprocess.run(["bash", "-c", f"printf '%s' {line}"], capture_output=True).stdout.decode()
        assert shown in real, (line, shown)

    table = run_uclip(["query", "a photo", "-n", "10"], env).ok().stdout
    assert "\x1b" not in table and len(table.splitlines()) == 4
    assert "esc\\x1b[31mred.jpg'" in table and "two\\nlines.jpg'" in table and table.count("$'/") == 2


def test_json_output_keeps_exact_names(tmp_path, env):
    import json

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "tab\there.jpg").write_bytes(jpeg_bytes(photo_like(64, 48, seed=3)))
    index_run(env, photos).ok()
    out = json.loads(invoke_uclip(["query", "x", "--format", "json"], env).ok().stdout)
    assert [r["path"] for r in out["results"]] == [str(photos / "tab\there.jpg")]

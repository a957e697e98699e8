"""`uclip index` end to end: the fixture folder, bad files and their report, and incremental re-runs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cli_helpers import (copy_tree, index_records, index_vectors, invoke_uclip, parse_summary, read_report,
                         run_uclip, uclip_env)
from exact_towers import exact_tower, pixels_of
from image_fixtures import jpeg_bytes, make_photo_folder, photo_like
from rounding import assert_float32_run_of, exact_inputs
from uclip_cli import bundle as B

# What each ImageDecodeError kind of the fixture folder says in the report.
REASON_WORDS = {"corrupt": "corrupt", "truncated": "truncated", "empty": "empty", "not_image": "not an image",
                "too_large": "too large"}


@pytest.fixture(scope="module")
def pristine_photos(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pristine") / "photos"
    return root, make_photo_folder(root)


@pytest.fixture
def photos(pristine_photos, tmp_path) -> Path:
    """A private copy of the fixture folder (tests change it)."""
    return copy_tree(pristine_photos[0], tmp_path / "photos").resolve()


@pytest.fixture
def layout(pristine_photos) -> dict:
    return pristine_photos[1]


@pytest.fixture
def index(tmp_path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def env(tmp_path, tiny_bundle, index) -> dict[str, str]:
    return uclip_env(tmp_path, bundle=tiny_bundle, index=index)


def index_folder(env: dict, *args) -> dict[str, int]:
    """`uclip index ARGS` in-process; its summary counts."""
    return parse_summary(invoke_uclip(["index", "--no-progress", "--batch-size", "4", *args], env).ok().stdout)


def absolute(root: Path, relative: list[str] | dict) -> set[str]:
    return {str(root / r) for r in relative}


def ok_paths(index: Path) -> set[str]:
    return {p for p, r in index_records(index).items() if r.status == "ok"}


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------- the fixture folder


def test_fixture_folder_counts_report_and_symlink_loop(photos, layout, env, index):
    result = run_uclip(["index", photos, "--batch-size", "4", "--no-progress"], env, timeout=60).ok()

    counts = parse_summary(result.stdout)
    good, bad = layout["good"], layout["bad"]
    assert counts == {"seen": len(good) + len(bad), "embedded": len(good), "moved": 0, "reused": 0, "unchanged": 0,
                      "skipped": len(bad), "removed": 0, "searchable": len(good), "skipped_in_all": len(bad)}
    records = index_records(index)
    assert ok_paths(index) == absolute(photos, good)
    assert set(records) == absolute(photos, good) | absolute(photos, bad)  # nothing hidden, nothing via the loop
    assert "loop" in layout and not any("/loop/" in p for p in records)

    report = read_report(index)
    assert set(report) == absolute(photos, bad)
    for relative, kind in bad.items():
        assert REASON_WORDS[kind] in report[str(photos / relative)], (relative, report[str(photos / relative)])
    assert str(index / "report.json") in result.stdout


def test_report_can_be_written_elsewhere(photos, layout, env, tmp_path):
    elsewhere = tmp_path / "reports" / "skipped.json"
    invoke_uclip(["index", photos, "--no-progress", "--report", elsewhere], env).ok()
    assert set(read_report(elsewhere)) == absolute(photos, layout["bad"])


def test_hidden_files_only_with_hidden_flag(photos, layout, env, index):
    index_folder(env, photos)
    assert not absolute(photos, layout["hidden"]) & set(index_records(index))

    counts = index_folder(env, photos, "--hidden")
    assert counts["embedded"] == len(layout["hidden"])
    assert absolute(photos, layout["hidden"]) <= ok_paths(index)


def test_exclude_globs(photos, layout, env, index):
    counts = index_folder(env, photos, "--exclude", "broken/*", "--exclude", "*.gif")
    expected = {p for p in layout["good"] if not p.endswith(".gif")}
    assert ok_paths(index) == absolute(photos, expected)
    assert counts["skipped"] == 0 and read_report(index) == {}
    assert not (index / "report.json").exists()


def test_exif_rotated_photo_is_indexed_upright(layout, pristine_photos, env, index, tmp_path, tiny_bundle,
                                                tiny_checkpoints):
    folder = tmp_path / "orientation"
    folder.mkdir()
    shutil.copy(pristine_photos[0] / layout["rotated"], folder / "rotated.jpg")
    stored = Image.open(folder / "rotated.jpg")
    stored.load()
    ImageOps.exif_transpose(stored).convert("RGB").save(folder / "upright.png")   # what a viewer shows
    stored.convert("RGB").save(folder / "sideways.png")                          # the pixels as stored

    index_folder(env, folder)
    features = {Path(p).name: v for p, v in index_vectors(index, "features").items()}
    encoder = exact_tower(tiny_checkpoints, B.IMAGE_ENCODER)
    upright_pixels = exact_inputs(pixels_of(folder / "upright.png", tiny_bundle))
    upright = assert_float32_run_of(features["rotated.jpg"][None], encoder, upright_pixels, what="rotated.jpg")
    assert_float32_run_of(features["upright.png"][None], encoder, upright_pixels, what="upright.png")
    sideways = assert_float32_run_of(features["sideways.png"][None], encoder,
                                     exact_inputs(pixels_of(folder / "sideways.png", tiny_bundle)))
    assert np.abs(upright.result.numpy() - sideways.result.numpy()).max() > 100 * upright.bound.numpy().max()


# ---------------------------------------------------------------------------- incremental runs


def test_rerun_decodes_nothing_and_says_so_in_plain_words(photos, layout, env, index):
    index_folder(env, photos)
    vectors, report = index_vectors(index), read_report(index)

    rerun = invoke_uclip(["index", "--no-progress", photos], env).ok().stdout
    total = len(layout["good"]) + len(layout["bad"])
    assert rerun.splitlines()[0] == f"nothing new to index: {total} files up to date"
    assert "images/s" not in rerun and "no encoder" not in rerun
    counts = parse_summary(rerun)
    assert counts == {"seen": total, "embedded": 0, "moved": 0, "reused": 0, "unchanged": total, "skipped": 0,
                      "removed": 0, "searchable": len(layout["good"]), "skipped_in_all": len(layout["bad"])}
    after = index_vectors(index)
    assert after.keys() == vectors.keys() and all(bit_equal(after[p], vectors[p]) for p in vectors)
    assert read_report(index) == report


def test_touched_file_is_reused_and_modified_file_reembedded(photos, env, index):
    index_folder(env, photos)
    before = index_vectors(index)
    beach, portrait = str(photos / "beach.jpg"), str(photos / "portrait.jpeg")

    stat = os.stat(beach)
    os.utime(beach, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
    counts = index_folder(env, photos)
    assert (counts["embedded"], counts["reused"]) == (0, 1)
    assert bit_equal(index_vectors(index)[beach], before[beach])

    (photos / "portrait.jpeg").write_bytes(jpeg_bytes(photo_like(240, 320, seed=99)))
    counts = index_folder(env, photos)
    assert (counts["embedded"], counts["reused"], counts["removed"]) == (1, 0, 0)
    assert not np.allclose(index_vectors(index)[portrait], before[portrait], atol=1e-3)


def test_deleted_file_leaves_index_and_results(photos, layout, env, index):
    index_folder(env, photos)
    (photos / "beach.jpg").unlink()
    (photos / "broken/empty.jpg").unlink()

    counts = index_folder(env, photos)
    assert (counts["removed"], counts["embedded"]) == (2, 0)
    assert counts["searchable"] == len(layout["good"]) - 1
    assert str(photos / "beach.jpg") not in index_records(index)
    assert str(photos / "broken/empty.jpg") not in read_report(index)
    listed = invoke_uclip(["query", "a beach", "--top", "100", "--format", "paths"], env).ok().stdout.splitlines()
    assert len(listed) == len(layout["good"]) - 1 and str(photos / "beach.jpg") not in listed


def test_moved_and_renamed_files_reuse_their_vectors(photos, env, index):
    index_folder(env, photos)
    before = index_vectors(index)
    (photos / "beach.jpg").rename(photos / "beach renamed.jpg")
    (photos / "albums/moved").mkdir()
    (photos / "panorama.png").rename(photos / "albums/moved/panorama.png")
    shutil.copy2(photos / "portrait.jpeg", photos / "portrait copy.jpeg")     # a copy is reused, not moved

    shown = invoke_uclip(["index", "--no-progress", photos], env).ok().stdout
    assert ": 0 embedded, 2 moved or renamed, 1 reused (content already indexed: copied or touched)" in shown
    assert shown.splitlines()[0].endswith(" 0 removed") and "images/s" not in shown
    counts = parse_summary(shown)
    assert (counts["embedded"], counts["moved"], counts["reused"], counts["removed"]) == (0, 2, 1, 0)
    after = index_vectors(index)
    assert bit_equal(after[str(photos / "beach renamed.jpg")], before[str(photos / "beach.jpg")])
    assert bit_equal(after[str(photos / "albums/moved/panorama.png")], before[str(photos / "panorama.png")])
    assert str(photos / "beach.jpg") not in after and str(photos / "panorama.png") not in after


def test_bad_files_are_not_retried_until_they_change(photos, layout, env, index):
    index_folder(env, photos)
    assert index_folder(env, photos)["skipped"] == 0

    corrupt = photos / "broken/corrupt.jpg"
    corrupt.write_bytes(jpeg_bytes(photo_like(120, 90, seed=5)))
    counts = index_folder(env, photos)
    assert (counts["embedded"], counts["skipped"], counts["skipped_in_all"]) == (1, 0, len(layout["bad"]) - 1)
    assert str(corrupt) in ok_paths(index)
    assert set(read_report(index)) == absolute(photos, layout["bad"]) - {str(corrupt)}

    (photos / "broken/notes.jpg").write_text("still not a photo, longer now\n")
    counts = index_folder(env, photos)
    assert (counts["embedded"], counts["skipped"]) == (0, 1)
    assert "not an image" in read_report(index)[str(photos / "broken/notes.jpg")]


def test_several_folders_in_one_index_and_query_in_folder(photos, layout, env, index, tmp_path):
    holiday = tmp_path / "holiday"
    holiday.mkdir()
    for i in range(3):
        (holiday / f"day {i}.jpg").write_bytes(jpeg_bytes(photo_like(96, 72, seed=200 + i)))

    index_folder(env, photos)
    counts = index_folder(env, holiday)
    assert (counts["embedded"], counts["removed"], counts["searchable"]) == (3, 0, len(layout["good"]) + 3)
    assert absolute(photos, layout["good"]) <= ok_paths(index)

    def query_in(folder: Path) -> list[str]:
        return invoke_uclip(["query", "a sunny day", "--top", "100", "--format", "paths", "--in", folder], env).ok().stdout.splitlines()

    assert sorted(query_in(holiday)) == sorted(str(holiday / f"day {i}.jpg") for i in range(3))
    albums = photos / "albums"
    assert set(query_in(albums)) == {p for p in absolute(photos, layout["good"]) if p.startswith(f"{albums}/")}
    assert len(query_in(photos)) == len(layout["good"])
    # a prefix of "albums" is another folder, one the index holds nothing under: it says so (issue 7, 3.12)
    message = invoke_uclip(["query", "a sunny day", "--in", photos / "alb"], env).one_line_error()
    assert f"--in {photos / 'alb'}" in message and "holds no photo under it" in message

    (holiday / "day 0.jpg").unlink()
    counts = index_folder(env, holiday)
    assert counts["removed"] == 1 and absolute(photos, layout["good"]) <= ok_paths(index)


def test_index_without_folders_updates_every_indexed_folder_and_keeps_an_absent_one(env, index, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 1), (second, 2)):
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=seed)))
    index_folder(env, first)
    index_folder(env, second)
    (first / "b.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=3)))
    assert index_folder(env)["embedded"] == 1                     # the new file in `first`, found without naming it
    assert ok_paths(index) == {str(first / "a.jpg"), str(first / "b.jpg"), str(second / "a.jpg")}
    shutil.move(second, tmp_path / "unmounted")
    result = invoke_uclip(["index", "--no-progress"], env).ok()
    assert f"{second} is not there now" in result.stderr
    assert str(second / "a.jpg") in ok_paths(index)               # an unmounted drive's photos are not dropped
    assert "forgot 1 files" in invoke_uclip(["forget", second], env).ok().stdout
    assert ok_paths(index) == {str(first / "a.jpg"), str(first / "b.jpg")}


def test_index_without_folders_on_a_new_index_says_what_to_do(env):
    assert "uclip index FOLDER" in invoke_uclip(["index"], env).one_line_error()


@pytest.mark.parametrize("wrong", ["7", "25"])
def test_a_wrong_d_search_in_the_meta_names_the_command_that_repairs_it(env, index, tmp_path, wrong):
    """Issue 19 item 8: the advice must not send the user back to the command that gave it."""
    import sqlite3

    folder = tmp_path / "few"
    folder.mkdir()
    for seed in range(3):
        (folder / f"p{seed}.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=seed)))
    index_folder(env, folder)
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'd_search'", (wrong,))
    for args in (["index", "--no-progress"], ["index", folder, "--no-progress"], ["query", "a photo"]):
        message = invoke_uclip(args, env).one_line_error()    # a query too: no traceback, the same advice
        assert f"says {wrong}-d search vectors" in message and "run `uclip index --rebuild`" in message
    repair = invoke_uclip(["check", "--repair"], env)
    assert "Traceback" not in repair.stderr and "--rebuild" in repair.stdout + repair.stderr
    assert index_folder(env, "--rebuild")["embedded"] == 3             # the advice, followed, repairs it
    assert invoke_uclip(["index", "--no-progress"], env).ok().stdout.startswith("nothing new to index: 3 files")
    results = invoke_uclip(["query", "a photo", "--format", "json"], env).ok().stdout
    assert all(str(folder / f"p{i}.jpg") in results for i in range(3))


def test_nested_roots_are_indexed_once(photos, layout, env, index):
    counts = index_folder(env, photos, photos / "albums", photos)
    assert counts["embedded"] + counts["skipped"] == len(layout["good"]) + len(layout["bad"])
    assert all(r.root == str(photos) for r in index_records(index).values())


def test_no_session_is_still_loading_when_index_returns(env, index, tmp_path, monkeypatch):
    """`uclip index` starts loading the image encoder in a thread while the first photos decode; when every
    photo fails (nothing to encode) the command must still not return with that load running behind it: the next
    command in the same process (a library caller, the test suite) would meet a half-built session."""
    import threading
    import time

    from uclip_cli.sessions import SessionFactory

    real_create = SessionFactory.create

    def slow_create(self, *args, **kwargs):        # a big graph: loading outlasts decoding three broken files
        time.sleep(1.0)
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(SessionFactory, "create", slow_create)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"not_a_photo_{i}.jpg").write_bytes(b"\xff\xd8 this is not a JPEG " * (i + 1))
    invoke_uclip(["index", broken, "--no-progress"], env).ok()      # three files skipped, none embedded
    assert not [t for t in threading.enumerate() if t.name == "uclip-session-preload"]

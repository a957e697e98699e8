"""The image pipeline: one extension list, stages in order, threads ahead of the encoder, every user on it."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from image_fixtures import jpeg_bytes, photo_like
from rounding import assert_within, gamma
from uclip_cli import bundle as B
from uclip_cli.encoders import Encoders
from uclip_cli.sessions import SessionFactory
from uclip_cli.evaluate import _image_files
from uclip_cli.images import decode_image, preprocess
from uclip_cli.image_pipeline import (BatchEncoder, FeatureSink, ListedFile, Prepared, Preparer, batched, hash_bytes,
                                prepare_in_threads, run_pipeline, stat_files)
from uclip_cli.terms import IMAGE, parse_terms
from uclip_cli.walk import IMAGE_EXTENSIONS, walk_images


def entry(path: str) -> ListedFile:
    return ListedFile(Path(path), Path("/"), 0, 0)


# ---------------------------------------------------------------------------- one extension list


def test_every_command_finds_the_same_image_files(tmp_path: Path):
    """Walk (index, train, embed), eval's folder reader and `uclip query IMAGE` agree on every suffix, in any case."""
    names = {f"photo{i}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(sorted(IMAGE_EXTENSIONS))}
    for name in names | {"notes.txt", "raw.cr2", "noext"}:
        (tmp_path / name).write_bytes(b"x")
    walked = {e.path.name for e in walk_images([tmp_path])}
    evaluated = {p.name for p in _image_files(tmp_path)}
    queried = {p.name for p in tmp_path.iterdir() if parse_terms(p.name).terms[0].kind == IMAGE}
    assert walked == evaluated == queried == names
    assert {".jfif", ".jpe", ".dib"} <= IMAGE_EXTENSIONS   # the suffixes the walk's own list used to miss


# ---------------------------------------------------------------------------- threads


def test_prepare_in_threads_keeps_input_order_and_runs_ahead_in_several_threads():
    seen_threads: set[str] = set()

    def prepare(e):
        seen_threads.add(threading.current_thread().name)
        time.sleep(0.01 * (int(Path(e.path).stem) % 3))   # finish out of order
        return Prepared(e, content_hash=Path(e.path).stem)

    out = list(prepare_in_threads(prepare, [entry(f"/{i}.jpg") for i in range(24)], workers=3))
    assert [p.content_hash for p in out] == [str(i) for i in range(24)]
    assert len(seen_threads) >= 2 and threading.current_thread().name not in seen_threads


def test_a_stuck_file_is_given_up_and_the_run_goes_on():
    """A read that never returns (a dead network mount) costs one file and the time limit, not the run."""
    release = threading.Event()

    def prepare(e):
        if Path(e.path).name == "stuck.jpg":
            release.wait(60)
        return Prepared(e, content_hash="ok")

    started = time.monotonic()
    try:
        out = list(prepare_in_threads(prepare, [entry("/a.jpg"), entry("/stuck.jpg"), entry("/b.jpg")],
                                      workers=1, file_timeout=0.5))
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert [p.status for p in out] == ["known", "failed", "known"]
    assert "gave up after 0.5 s" in out[1].error and str(out[1].entry.path) == "/stuck.jpg"


def test_a_bug_in_a_stage_is_raised_not_swallowed():
    def prepare(e):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        list(prepare_in_threads(prepare, [entry("/a.jpg")], workers=2))


# ---------------------------------------------------------------------------- batches


def test_batches_bound_files_to_encode_and_never_repeat_a_path():
    items = [Prepared(entry(f"/{i}.jpg"), "h", pixels=np.zeros(1)) for i in range(5)]
    assert [len(b) for b in batched(items, 2)] == [2, 2, 1]
    failed = [Prepared(entry(f"/f{i}.jpg"), error="bad") for i in range(9)]
    assert [len(b) for b in batched(failed, 2)] == [8, 1]       # 4 x batch size of cheap records per commit
    twice = [Prepared(entry("/same.jpg"), error="bad"), Prepared(entry("/same.jpg"), "h", pixels=np.zeros(1))]
    assert [len(b) for b in batched(twice, 8)] == [1, 1]


# ---------------------------------------------------------------------------- stages end to end


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pipeline_photos")
    files = []
    for i in range(7):
        files.append(folder / f"p{i}.jpg")
        files[-1].write_bytes(jpeg_bytes(photo_like(96 + 8 * i, 80, seed=i)))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    files.insert(3, folder / "broken.jpg")
    return files


def test_each_row_comes_from_its_own_file_whatever_the_threads_and_batches(photo_files, tiny_bundle):
    """An exact stand-in encoder (each row: a slice of that image's own pixels) shows the stages never
    reorder, drop or mix files across threads and batches; the real tower then runs through the same stages."""
    bundle = B.load_bundle(tiny_bundle)
    d = 16
    probe = BatchEncoder(lambda pixels: pixels.reshape(len(pixels), -1)[:, :d].copy(), d)
    sink = FeatureSink()
    run_pipeline(stat_files(photo_files), Preparer(bundle.image), probe, sink, workers=3, batch_size=3)
    good = [p for p in photo_files if p.name != "broken.jpg"]
    assert [e.path for e in sink.entries] == good
    assert [(e.path.name, "not an image" in reason) for e, reason in sink.failed] == [("broken.jpg", True)]
    for row, path in zip(sink.features(d), good):
        pixels = preprocess(decode_image(path.read_bytes(), name=path.name, target_size=bundle.image.size), bundle.image)
        assert np.array_equal(row, pixels.reshape(-1)[:d])

    real = FeatureSink()
    run_pipeline(stat_files(photo_files), Preparer(bundle.image), BatchEncoder.of(Encoders(bundle, SessionFactory(device="cpu", threads=1)), project=True), real,
                 workers=2, batch_size=4)
    features, vectors = real.features(bundle.dims["clip"]), real.vectors()
    assert features.shape == (len(good), bundle.dims["clip"]) and vectors.shape[0] == len(good)
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    # x / ||x|| in float32: the d-term sum of squares (gamma(d)), its square root and the division (a few u)
    assert_within(norms, 1.0, gamma(bundle.dims["clip"] + 4), "feature norms")


def test_preparer_skips_decoding_known_content(photo_files, tiny_bundle, monkeypatch):
    bundle = B.load_bundle(tiny_bundle)
    digest = hash_bytes(photo_files[0].read_bytes())
    import uclip_cli.images as images

    def no_decode(*a, **k):
        raise AssertionError("decoded content the index already holds")

    monkeypatch.setattr(images, "decode_image", no_decode)
    item = Preparer(bundle.image, known={digest}.__contains__)(stat_files(photo_files[:1])[0])
    assert item.status == "known" and item.content_hash == digest


def test_a_file_that_cannot_be_listed_is_reported_not_lost(tmp_path):
    (entry_,) = stat_files([tmp_path / "gone.jpg"])
    item = Preparer(B.ImageSettings())(entry_)
    assert item.status == "failed" and "No such file" in item.error

"""kill -9 at any moment of `uclip index`, then a re-run: nothing lost, nothing duplicated, same vectors.

A subprocess indexes ~200 small images in batches of 4 (one commit per batch) and is SIGKILLed
several times: during start-up, as the index is created, as soon as the catalogue (polled read-only)
holds N records, and once all records are in (clean-up, compaction, report).
The re-run must end with exactly the index an uninterrupted run builds.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from cli_helpers import index_records, index_vectors, invoke_uclip, parse_summary, read_report, uclip_env
from exact_towers import assert_same_image_vectors
from image_fixtures import jpeg_bytes, photo_like

GOOD_IMAGES = 200
BAD_FILES = {"bad/empty.jpg": b"", "bad/notes.jpg": b"not a photo\n", "bad/half.jpg": None}   # None: a truncated JPEG
TOTAL = GOOD_IMAGES + len(BAD_FILES)
KILL_AFTER_SECONDS = 0.3                            # during start-up (imports, bundle check, sessions)
KILL_AT_RECORDS = (1, 30, 75, 120, 170, 199, TOTAL)  # cumulative records (each run resumes where the last stopped);
                                                     # TOTAL: during the final clean-up, compaction and report
INDEX_ARGS = ("--batch-size", "4", "--workers", "2", "--no-progress")


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "photos"
    for i in range(GOOD_IMAGES):
        path = root / f"set{i % 4}" / f"img_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo_like(72, 56, seed=1000 + i), quality=85))
    for relative, data in BAD_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if data is not None else jpeg_bytes(photo_like(72, 56, seed=7))[:300])
    return root.resolve()


def read_only(index: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"file:{index / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1))


def committed_records(index: Path) -> int:
    """Records in the catalogue as a reader sees them now (0 before the index exists)."""
    if not (index / "catalog.sqlite").exists():
        return 0
    try:
        with read_only(index) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.Error:   # created, but no schema committed yet
        return 0


def start_index(folder: Path, index: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "uclip_cli.cli", "index", str(folder), "--index", str(index),
                             *INDEX_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process: subprocess.Popen, ready, deadline_s: float = 30) -> bool:
    """SIGKILL `process` as soon as ready() holds; True if it was still running then."""
    deadline = time.monotonic() + deadline_s
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return running


def assert_rows_consistent(index: Path) -> None:
    """Every committed row is used by exactly the 'ok' records that point at it, or is listed as dead."""
    with read_only(index) as conn:
        rows = int(conn.execute("SELECT value FROM meta WHERE key = 'rows'").fetchone()[0])
        used = [r for (r,) in conn.execute("SELECT row FROM files WHERE status = 'ok'")]
        dead = {r for (r,) in conn.execute("SELECT row FROM dead")}
    assert len(used) == len(set(used)), "two images share one row: something was stored twice or mixed up"
    assert set(used) | dead == set(range(rows)) and not set(used) & dead


def test_kill_9_at_any_moment_then_rerun_gives_the_clean_index(many_photos, tiny_bundle, tiny_checkpoints, tmp_path):
    env = uclip_env(tmp_path, bundle=tiny_bundle)
    clean = tmp_path / "clean_index"
    invoke_uclip(["index", many_photos, "--index", clean, *INDEX_ARGS], env).ok()

    crashed = tmp_path / "crashed_index"
    killed_mid_run = 0
    started = time.monotonic()
    kill_when(start_index(many_photos, crashed, env), lambda: time.monotonic() - started >= KILL_AFTER_SECONDS)
    kill_when(start_index(many_photos, crashed, env), (crashed / "catalog.sqlite").exists)   # while creating the index
    for records in KILL_AT_RECORDS:
        was_running = kill_when(start_index(many_photos, crashed, env), lambda: committed_records(crashed) >= records)
        at_kill = committed_records(crashed)
        killed_mid_run += was_running and 0 < at_kill < TOTAL
        assert_rows_consistent(crashed)   # consistent after every kill, not only after the re-run
    assert killed_mid_run >= 4, f"only {killed_mid_run} kills landed while images were being indexed"

    final = invoke_uclip(["index", many_photos, "--index", crashed, *INDEX_ARGS], env).ok()
    counts = parse_summary(final.stdout)
    assert counts["seen"] == TOTAL and counts["searchable"] == GOOD_IMAGES
    assert counts["skipped_in_all"] == len(BAD_FILES) and counts["reused"] == 0

    records, reference = index_records(crashed), index_records(clean)
    assert set(records) == set(reference) and len(records) == TOTAL
    assert {p: r.status for p, r in records.items()} == {p: r.status for p, r in reference.items()}
    assert {p: r.content_hash for p, r in records.items()} == {p: r.content_hash for p, r in reference.items()}
    assert_rows_consistent(crashed)
    for kind in ("features", "vectors"):
        got, want = index_vectors(crashed, kind), index_vectors(clean, kind)
        assert got.keys() == want.keys() and len(got) == GOOD_IMAGES
        assert_same_image_vectors(got, want, tiny_checkpoints, tiny_bundle)   # the bundle has no heads
    assert read_report(crashed) == read_report(clean)
    assert set(read_report(crashed)) == {str(many_photos / p) for p in BAD_FILES}
    json.loads((crashed / "report.json").read_text(encoding="utf-8"))   # complete, not a torn write


def test_ctrl_c_keeps_what_was_committed_and_a_rerun_resumes(many_photos, tiny_bundle, tmp_path):
    env = uclip_env(tmp_path, bundle=tiny_bundle)
    index = tmp_path / "index"
    process = subprocess.Popen([sys.executable, "-m", "uclip_cli.cli", "index", str(many_photos), "--index", str(index),
                                "--batch-size", "1", "--no-progress"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while process.poll() is None and committed_records(index) < 20 and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr.decode()
    assert "interrupted" in stderr.decode() and "Traceback" not in stderr.decode()
    kept = committed_records(index)
    assert 20 <= kept < TOTAL

    counts = parse_summary(invoke_uclip(["index", many_photos, "--index", index, *INDEX_ARGS], env).ok().stdout)
    assert counts["unchanged"] == kept and counts["embedded"] + counts["skipped"] == TOTAL - kept
    assert counts["searchable"] == GOOD_IMAGES

"""`uclip embed` on a local Ray (2 CPUs) and `uclip index --import`: same results as `uclip index`, and no file
lost or doubled when a worker or the driver dies.

One Ray cluster serves the module (Ray takes seconds to start); the folders are small.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from optional import needs

ray = needs("ray", "the `ray` extra: pip install '.[ray]'")

from cli_helpers import index_records, index_vectors, invoke_uclip, parse_summary, uclip_env  # noqa: E402
from image_fixtures import jpeg_bytes, make_photo_folder, photo_like  # noqa: E402
from uclip_cli.embed import EmbedOptions, run_embed  # noqa: E402
from uclip_cli.shards import read_shard, shard_files  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def heads_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with random trained-shape heads: shards then carry Head_B vectors too."""
    import shutil

    import torch

    from conftest import single_torch_thread
    from uclip_cli.bundle import load_bundle
    from uclip_cli.train.heads import UCLIPHeads, write_heads_into_bundle

    path = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("heads") / "bundle")
    dims = load_bundle(path).dims
    with single_torch_thread():
        torch.manual_seed(0)
        write_heads_into_bundle(UCLIPHeads(dims["multilingual"], dims["clip"]).eval(), path, {"note": "random, for tests"})
    return path


@pytest.fixture(scope="module")
def fixture_photos(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("embed") / "photos"
    return root, make_photo_folder(root)


def shard_rows(out: Path) -> dict[str, dict]:
    """path -> its shard row (status, reason, hash, features, vectors), checking that no path is in two rows."""
    rows: dict[str, dict] = {}
    for path in shard_files([out]):
        _, shard = read_shard(path)
        k = 0
        for i, p in enumerate(shard.path):
            assert p not in rows, f"{p} is in two shard rows"
            ok = shard.status[i] == "ok"
            rows[p] = {"status": shard.status[i], "reason": shard.reason[i], "hash": shard.content_hash[i],
                       "features": shard.features[k] if ok else None,
                       "vectors": shard.vectors[k] if ok and shard.vectors is not None else None}
            k += ok
    return rows


def query_json(env: dict, index: Path, text: str) -> list[dict]:
    out = invoke_uclip(["query", text, "--index", index, "--format", "json", "-n", "50"], env).ok().stdout
    return json.loads(out)["results"]


UCLIP_RAY_LINE = r"Ray: \d+ CPUs, \d+ GPUs (on this machine|at \S+)"   # uclip's own line saying where it runs


def embed_command(photos: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uclip_cli.cli", "embed", str(photos), "--out", str(out), "--no-progress", *extra]


def few_photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        (folder / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=i)))
    return folder


# First in the module: it starts a Ray of its own (the user's default), before the module's cluster exists.
def test_a_run_on_its_own_local_ray_shows_the_user_uclip_lines_not_ray_logs(tiny_bundle, tmp_path):
    env = {k: v for k, v in uclip_env(tmp_path, bundle=tiny_bundle).items() if k != "RAY_ADDRESS"}
    out = tmp_path / "shards"
    done = subprocess.run(embed_command(few_photos(tmp_path / "photos", 3), out, "--shard-size", "2"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # Ray prints, unless told otherwise, a token-authentication notice, Ray Data's INFO lines for each execution
    # and its core worker's "E ... core_worker.cc" line about Ray Data's actors: none may reach the user.
    assert re.fullmatch(UCLIP_RAY_LINE + "\n", done.stderr), done.stderr
    assert "embedded 3 files" in done.stdout and "2 shards written" in done.stdout


def test_a_failing_worker_reaches_the_user_as_one_line(ray_cluster, tiny_bundle, tmp_path):
    import shutil

    from uclip_cli.bundle import IMAGE_ENCODER, update_manifest

    broken = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    (broken / IMAGE_ENCODER).write_bytes(b"not an ONNX graph")   # loads in the encoder actor only: it fails there
    update_manifest(broken)
    out = tmp_path / "shards"
    done = subprocess.run(embed_command(few_photos(tmp_path / "photos", 2), out, "--ray-address", ray_cluster),
                          env=uclip_env(tmp_path, bundle=broken), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    *before, last = done.stderr.splitlines()
    assert all(re.fullmatch(UCLIP_RAY_LINE, line) for line in before), done.stderr   # no traceback, no Ray log
    assert last.startswith(f"uclip: error: cannot load {broken / IMAGE_ENCODER}"), done.stderr
    assert not list(out.glob("shard-*.parquet"))


def test_shards_equal_uclip_index_and_import_gives_the_same_index(fixture_photos, ray_cluster, heads_bundle, tmp_path):
    photos, layout = fixture_photos
    env = uclip_env(tmp_path, bundle=heads_bundle)
    out = tmp_path / "shards"
    summary = run_embed([str(photos)], out, heads_bundle, EmbedOptions(shard_size=4, batch_size=1, progress=False))
    total = len(layout["good"]) + len(layout["bad"])
    assert (summary.embedded, summary.failed, summary.files) == (len(layout["good"]), len(layout["bad"]), total)
    assert summary.shards == summary.written == -(-total // 4) and summary.done_before == 0

    direct = tmp_path / "direct"
    invoke_uclip(["index", photos, "--index", direct, "--batch-size", "1", "--no-progress"], env).ok()
    records, rows = index_records(direct), shard_rows(out)
    assert rows.keys() == records.keys()                        # the same files: hidden ones, the loop, skipped ones
    for path, record in records.items():
        row = rows[path]
        assert (row["status"], row["reason"], row["hash"]) == (record.status, record.error, record.content_hash), path
    features, vectors = index_vectors(direct, "features"), index_vectors(direct, "vectors")
    for path in features:
        # The same pixels (bit for bit: the same Preparer, the same normalisation) through the same graph, one
        # image per batch in both: ONNX Runtime computes identical bits. A float tolerance here would only hide
        # a difference in decoding or preprocessing, which is what this test is for.
        assert np.array_equal(rows[path]["features"], features[path]), path
        assert np.array_equal(rows[path]["vectors"], vectors[path]), path

    imported = tmp_path / "imported"
    counts = parse_summary(invoke_uclip(["index", "--import", out, "--index", imported, "--no-progress"], env).ok().stdout)
    assert (counts["seen"], counts["embedded"], counts["skipped"]) == (total, len(layout["good"]), len(layout["bad"]))
    assert {p: (r.status, r.error, r.content_hash) for p, r in index_records(imported).items()} == \
           {p: (r.status, r.error, r.content_hash) for p, r in records.items()}
    for text in ("a beach", "mačka na kauču"):      # the same photos and scores; shards carry no photo metadata
        unfiltered = [{k: v for k, v in hit.items() if k != "taken"} for hit in query_json(env, direct, text)]
        assert query_json(env, imported, text) == unfiltered  # (capture times come with the next `uclip index`)

    again = parse_summary(invoke_uclip(["index", "--import", out, "--index", imported, "--no-progress"], env).ok().stdout)
    assert (again["unchanged"], again["embedded"], again["skipped"], again["searchable"]) == \
           (total, 0, 0, len(layout["good"]))                 # importing twice changes nothing
    assert json.loads((out / "report.json").read_text())["skipped"]


def _encoder_actor_pids() -> list[int]:
    """Processes of this machine running the encoder actor (Ray titles them ray::MapWorker(MapBatches(_EncodeShards)))."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"_EncodeShards" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return [pid for pid in pids if pid != os.getpid()]


def test_a_worker_killed_mid_run_is_retried_and_every_file_lands_once(fixture_photos, ray_cluster, tiny_bundle, tmp_path):
    photos, layout = fixture_photos
    out = tmp_path / "shards"
    killed: list[int] = []

    def kill_encoder_once_a_shard_is_written():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if list(out.glob("shard-*.parquet")):
                for pid in _encoder_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_encoder_once_a_shard_is_written, daemon=True)
    killer.start()
    summary = run_embed([str(photos)], out, tiny_bundle, EmbedOptions(shard_size=2, progress=False))
    killer.join(timeout=5)
    assert killed, "no encoder actor was found to kill"
    total = len(layout["good"]) + len(layout["bad"])
    rows = shard_rows(out)                                   # raises if a file is in two rows
    assert len(rows) == total and summary.shards == -(-total // 2)
    assert sum(r["status"] == "ok" for r in rows.values()) == len(layout["good"])


def test_a_killed_driver_loses_nothing_and_the_rerun_skips_finished_shards(ray_cluster, tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=i)))
    env = uclip_env(tmp_path, bundle=tiny_bundle)
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "uclip_cli.cli", "embed", str(photos), "--out", str(out), "--shard-size", "1",
               "--ray-address", ray_cluster, "--no-progress"]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while driver.poll() is None and not list(out.glob("shard-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.kill()
    driver.communicate(timeout=60)
    done_at_kill = len(list(out.glob("shard-*.parquet")))
    assert 1 <= done_at_kill, "the driver was killed before any shard was written"

    rerun = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()

    written, before = map(int, re.search(r"(\d+) shards written, (\d+) already done", rerun.stdout.decode()).groups())
    assert before >= done_at_kill and written + before == 12        # finished shards were not redone
    rows = shard_rows(out)                                          # each file in exactly one row
    assert sorted(rows) == [str(photos / f"p{i:02d}.jpg") for i in range(12)]
    assert all(r["status"] == "ok" for r in rows.values())


def test_a_truncated_finished_shard_is_set_aside_and_embedded_again(ray_cluster, tiny_bundle, tmp_path):
    """Issue 19 item 8: a finished shard cut short blocked the resume (its report could not be read)."""
    photos = few_photos(tmp_path / "photos", 3)
    out = tmp_path / "shards"
    options = EmbedOptions(shard_size=1, progress=False, ray_address=ray_cluster)
    run_embed([str(photos)], out, tiny_bundle, options)
    before = shard_rows(out)
    cut = out / "shard-000001.parquet"
    cut.write_bytes(cut.read_bytes()[:-100])                 # the footer is gone
    notes: list[str] = []
    summary = run_embed([str(photos)], out, tiny_bundle, options, log=notes.append)
    assert (summary.written, summary.done_before) == (1, 2)
    assert any(f"{cut} is damaged" in n and "shard-000001.parquet.damaged" in n for n in notes), notes
    assert (out / "shard-000001.parquet.damaged").exists()
    again = shard_rows(out)                                  # every shard reads, each file once, as before
    assert again.keys() == before.keys()
    assert all(np.array_equal(again[p]["features"], before[p]["features"]) for p in before)

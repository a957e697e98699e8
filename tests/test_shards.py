"""Shards without Ray: the Parquet format, `uclip index --import`'s refusals, remote listing, and Ray kept optional."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke_uclip, uclip_env
from optional import needs
from uclip_cli import bundle as B
from uclip_cli.extras import install_command

needs("pyarrow", "shards need pyarrow, the `ray` extra: pip install '.[ray]'")

from uclip_cli.shards import ShardInfo, ShardRows, read_shard, shard_name, write_shard  # noqa: E402

UCLIP_CLI = Path(__file__).resolve().parents[1] / "uclip_cli"


def rows(n_ok: int, n_failed: int, d: int = 4) -> ShardRows:
    status = ["ok"] * n_ok + ["error"] * n_failed
    rng = np.random.default_rng(0)
    return ShardRows(path=[f"/p/{i}.jpg" for i in range(len(status))], root=["/p"] * len(status),
                     size=list(range(len(status))), mtime_ns=[10**18 + i for i in range(len(status))],
                     content_hash=[f"{i:032x}" for i in range(n_ok)] + [None] * n_failed, status=status,
                     reason=[None] * n_ok + ["corrupt JPEG"] * n_failed,
                     features=rng.standard_normal((n_ok, d)).astype(np.float32), vectors=None)


def test_a_shard_round_trips_exactly_with_failed_rows(tmp_path):
    written = rows(3, 2)
    info = ShardInfo("img", "heads", 4, 4, "b")
    write_shard(tmp_path / shard_name(0), written, info)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.parquet"]     # no temporary file left
    got_info, got = read_shard(tmp_path / shard_name(0))
    assert got_info == info
    assert got.path == written.path and got.status == written.status and got.reason == written.reason
    assert got.content_hash == written.content_hash and got.mtime_ns == written.mtime_ns
    assert np.array_equal(got.features, written.features) and got.vectors is None


def test_import_refuses_a_shard_of_another_image_encoder_in_one_line(tmp_path, tiny_bundle):
    bundle = B.load_bundle(tiny_bundle)
    d = bundle.dims["clip"]
    shard = rows(2, 0, d)
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / shard_name(0), shard, ShardInfo("another-encoder", bundle.heads_fingerprint, d, d, "x"))
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    message = invoke_uclip(["index", "--import", tmp_path / "shards", "--no-progress"], env).one_line_error()
    assert "another image encoder" in message and "shard-000000.parquet" in message


def test_import_of_a_damaged_shard_names_it(tmp_path, tiny_bundle):
    (tmp_path / "shards").mkdir()
    damaged = tmp_path / "shards" / shard_name(0)
    damaged.write_bytes(b"PAR1 not really parquet")
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    message = invoke_uclip(["index", "--import", damaged, "--no-progress"], env).one_line_error()
    assert str(damaged) in message and "shard" in message


def test_missing_ray_is_one_line_with_the_pip_command(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # as if the extra were not installed
    env = uclip_env(tmp_path, bundle=tiny_bundle)
    message = invoke_uclip(["embed", tmp_path, "--out", tmp_path / "out", "--no-progress"], env).one_line_error()
    assert install_command("ray") in message


def test_only_the_embed_module_imports_ray():
    importers = sorted(p.name for p in UCLIP_CLI.rglob("*.py")
                       if re.search(r"^\s*(import ray|from ray)", p.read_text(encoding="utf-8"), re.M))
    assert importers == ["embed.py"]


def test_a_folder_on_an_fsspec_filesystem_is_listed_and_read_with_the_cap(monkeypatch):
    fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed")
    from uclip_cli.embed import RemoteReader, list_uri
    from uclip_cli.images import ImageDecodeError

    memory = fsspec.filesystem("memory")
    memory.pipe("/album/b.jpg", b"jpeg bytes")
    memory.pipe("/album/a/c.PNG", b"png bytes")
    memory.pipe("/album/notes.txt", b"text")
    memory.pipe("/album/.hidden/d.jpg", b"x")
    listed = list_uri("memory://album")
    assert [e.path for e in listed] == ["memory:///album/a/c.PNG", "memory:///album/b.jpg"]
    assert [e.size for e in listed] == [9, 10] and all(e.root == "memory://album" for e in listed)
    assert RemoteReader()("memory:///album/b.jpg") == b"jpeg bytes"

    import uclip_cli.images as images

    monkeypatch.setattr(images, "byte_cap", lambda fmt, max_pixels=0: 4)
    with pytest.raises(ImageDecodeError, match="too large"):
        RemoteReader()("memory:///album/b.jpg")

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


# ------------------------------------------------------------------------------ hostile shards (issue 19 item 4)

def unit_rows(d: int, n: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shard_of(root: str, names: list[str], features: np.ndarray, hashes: list | None = None) -> ShardRows:
    n = len(names)
    return ShardRows(path=[name if name.startswith("/") else f"{root}/{name}" for name in names], root=[root] * n,
                     size=[100 + i for i in range(n)], mtime_ns=[10**18 + i for i in range(n)],
                     content_hash=hashes or [f"{i + 1:032x}" for i in range(n)], status=["ok"] * n, reason=[None] * n,
                     features=features, vectors=None)


def import_shards(tmp_path, tiny_bundle, shard: ShardRows):
    bundle = B.load_bundle(tiny_bundle)
    d = bundle.dims["clip"]
    folder = tmp_path / "shards"
    folder.mkdir(exist_ok=True)
    write_shard(folder / shard_name(0), shard, ShardInfo(bundle.image_fingerprint, bundle.heads_fingerprint, d, d, "x"))
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    return env, invoke_uclip(["index", "--import", folder, "--no-progress"], env)


def test_import_refuses_each_bad_row_with_its_reason_and_keeps_the_good_ones(tmp_path, tiny_bundle):
    import json

    from cli_helpers import index_vectors, parse_summary

    d = B.load_bundle(tiny_bundle).dims["clip"]
    features = unit_rows(d, 10)
    features[1, 3] = np.nan
    features[2] *= 3
    features[3] = 1e30
    features[4] = 0
    features[5, 0] = np.inf
    names = ["good0.jpg", "nan.jpg", "times3.jpg", "huge.jpg", "zero.jpg", "inf.jpg",
             "nohash.jpg", "badhash.jpg", "good0.jpg", "/elsewhere/out.jpg"]
    hashes = [f"{i + 1:032x}" for i in range(10)]
    hashes[6], hashes[7] = None, "ZZ" * 16
    root = str(tmp_path / "photos")
    env, result = import_shards(tmp_path, tiny_bundle, shard_of(root, names, features, hashes))
    out = result.ok().stdout                                   # no traceback, and the good row lands
    assert parse_summary(out)["searchable"] == 1 and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "index" / "report.json").read_text())
    reasons = {(r["path"].rsplit("/", 1)[-1], r["reason"]) for r in report["refused_rows"]}
    assert len(report["refused_rows"]) == 9 and "refused 9 shard rows" in out
    expected = {"nan.jpg": "features not finite", "times3.jpg": "not of unit length (norm 3",
                "huge.jpg": "e+30; uclip writes 1)", "zero.jpg": "not of unit length (norm 0",
                "inf.jpg": "features not finite", "nohash.jpg": "no content hash", "badhash.jpg": "not a blake2b-128",
                "good0.jpg": "listed twice in the shards", "out.jpg": f"is not inside its root {root}"}
    for name, words in expected.items():
        assert any(n == name and words in reason for n, reason in reasons), (name, reasons)
    stored = index_vectors(tmp_path / "index", "features")
    assert list(stored) == [f"{root}/good0.jpg"] and np.array_equal(stored[f"{root}/good0.jpg"], features[0])


def test_a_shard_whose_root_is_the_filesystem_root_is_refused_and_index_walks_nothing(tmp_path, tiny_bundle):
    import json

    d = B.load_bundle(tiny_bundle).dims["clip"]
    env, result = import_shards(tmp_path, tiny_bundle, shard_of("/", ["/a.jpg", "/b.jpg"], unit_rows(d, 2)))
    out = result.ok().stdout
    assert "refused 2 shard rows" in out and "root / is the whole filesystem" in out
    refused = json.loads((tmp_path / "index" / "report.json").read_text())["refused_rows"]
    assert [r["path"] for r in refused] == ["/a.jpg", "/b.jpg"]
    # No root "/" was recorded: a plain `uclip index` has no folder to walk (it would have walked everything).
    message = invoke_uclip(["index", "--no-progress"], env).one_line_error()
    assert "holds none" in message


def test_flipped_bytes_in_a_shard_are_refused_never_landed_silently(tmp_path, tiny_bundle):
    from cli_helpers import index_vectors

    d = B.load_bundle(tiny_bundle).dims["clip"]
    root = str(tmp_path / "photos")
    features = unit_rows(d, 40)
    shard = shard_of(root, [f"p{i}.jpg" for i in range(40)], features)
    bundle = B.load_bundle(tiny_bundle)
    for seed in range(4):
        folder = tmp_path / f"shards{seed}"
        folder.mkdir()
        path = folder / shard_name(0)
        write_shard(path, shard, ShardInfo(bundle.image_fingerprint, bundle.heads_fingerprint, d, d, "x"))
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(seed)
        for at in rng.choice(np.arange(4, len(data) - 8), 20, replace=False):   # 20 bytes, not the magic
            data[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / f"index{seed}")
        result = invoke_uclip(["index", "--import", folder, "--no-progress"], env)
        assert "Traceback" not in result.stderr + result.stdout
        if result.code != 0:
            assert str(path) in result.one_line_error()
            continue
        landed = index_vectors(tmp_path / f"index{seed}", "features")   # what landed is exactly what was written
        for p, f in landed.items():
            assert np.array_equal(f, features[shard.path.index(p)]), p


@pytest.fixture(scope="module")
def heads_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with random heads: its shards carry Head_B vectors that an import may keep."""
    import shutil

    torch = pytest.importorskip("torch", reason="writing heads needs torch")
    from conftest import single_torch_thread
    from uclip_cli.train.heads import UCLIPHeads, write_heads_into_bundle

    path = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("heads") / "bundle")
    dims = B.load_bundle(path).dims
    with single_torch_thread():
        torch.manual_seed(0)
        write_heads_into_bundle(UCLIPHeads(dims["multilingual"], dims["clip"]).eval(), path, {"note": "test"})
    return path


@pytest.mark.parametrize("heads", ["the bundle's", "other"])
def test_vectors_kept_as_they_are_are_checked_and_reprojected_ones_are_not(tmp_path, heads_bundle, heads):
    import json

    from cli_helpers import index_vectors
    from uclip_cli.encoders import Encoders
    from uclip_cli.sessions import SessionFactory

    bundle = B.load_bundle(heads_bundle)
    d, shared = bundle.dims["clip"], bundle.dims["shared"]
    root = str(tmp_path / "photos")
    shard = shard_of(root, ["good.jpg", "twice.jpg", "nan.jpg"], unit_rows(d, 3))
    shard.vectors = unit_rows(shared, 3, seed=2)
    shard.vectors[1] *= 2
    shard.vectors[2, 0] = np.nan
    fingerprint = bundle.heads_fingerprint if heads == "the bundle's" else "other-heads"
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / shard_name(0), shard,
                ShardInfo(bundle.image_fingerprint, fingerprint, d, shared, "x"))
    env = uclip_env(tmp_path, bundle=heads_bundle, index=tmp_path / "index")
    invoke_uclip(["index", "--import", tmp_path / "shards", "--no-progress"], env).ok()
    stored = index_vectors(tmp_path / "index")
    if heads == "other":                          # re-projected from the features: the shard's vectors are not data
        assert len(stored) == 3
        projected = Encoders(bundle, SessionFactory(device="cpu")).project_image(shard.features)
        assert np.allclose([stored[p] for p in shard.path], projected, atol=1e-6)
        return
    refused = json.loads((tmp_path / "index" / "report.json").read_text())["refused_rows"]
    assert {r["path"].rsplit("/", 1)[-1]: r["reason"].split(" (")[0] for r in refused} == \
           {"twice.jpg": "vectors not of unit length", "nan.jpg": "vectors not finite"}
    assert list(stored) == [shard.path[0]] and np.array_equal(stored[shard.path[0]], shard.vectors[0])

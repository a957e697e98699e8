"""Hostile and damaged bundles (issue 10 items 3, 6, 10, 11, 12, 17): refused in one line naming the key
or file, before any work; bit rot behind the checksum cache caught by every command that writes vectors;
no telemetry file written by onnxruntime."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import copy_bundle, invoke_uclip, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli import bundle as B
from uclip_cli.sessions import GraphMismatchError, SessionFactory


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / B.MANIFEST).read_text(encoding="utf-8"))


def write_manifest_json(bundle: Path, manifest) -> None:
    (bundle / B.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# Each: how to damage the manifest, and the key the one-line message must name.
MALFORMED = {
    "a JSON list": (lambda m: [m], "JSON list"),
    "no dims": (lambda m: m.pop("dims"), "dims"),
    "no image": (lambda m: m.pop("image"), "image"),
    "no tokenizers": (lambda m: m.pop("tokenizers"), "tokenizers"),
    "files as a list": (lambda m: m.update(files=list(m["files"])), "files"),
    "dims abc": (lambda m: m["dims"].update(clip="abc"), "dims.clip"),
    "dims as a bool": (lambda m: m["dims"].update(shared=True), "dims.shared"),
    "extreme dims": (lambda m: m["dims"].update(multilingual=10 ** 9), "dims.multilingual"),
    "unknown dims key": (lambda m: m["dims"].update(colour=3), "dims.colour"),
    "unknown image key": (lambda m: m["image"].update(colour="red"), "image.colour"),
    "image size 100000": (lambda m: m["image"].update(size=100_000), "image.size"),
    "image size 0": (lambda m: m["image"].update(size=0), "image.size"),
    "std 0": (lambda m: m["image"].update(std=[0, 0.5, 0.5]), "image.std[0]"),
    "mean of 2 values": (lambda m: m["image"].update(mean=[0.5, 0.5]), "image.mean"),
    "mean NaN": (lambda m: m["image"].update(mean=[float("nan"), 0.5, 0.5]), "image.mean[0]"),
    "unknown resize mode": (lambda m: m["image"].update(resize_mode="stretch"), "image.resize_mode"),
    "unknown resample": (lambda m: m["image"].update(resample="lanczos"), "image.resample"),
    "rescale 0": (lambda m: m["image"].update(rescale_factor=0), "image.rescale_factor"),
    "text window 10**7": (lambda m: m["tokenizers"]["multilingual"].update(max_length=10 ** 7),
                          "tokenizers.multilingual.max_length"),
    "unknown padding": (lambda m: m["tokenizers"]["multilingual"].update(padding="left"),
                        "tokenizers.multilingual.padding"),
    "checksum not hex": (lambda m: m["files"].update({B.IMAGE_ENCODER: "abc"}), "files.image_encoder.onnx"),
    "parent path": (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "../../etc/passwd"),
    "absolute path": (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "/etc/passwd"),
    "tokenizer file not listed": (lambda m: m["files"].pop(B.TOKENIZER_CLIP), "tokenizers.clip.file"),
    "tokenizer file outside": (lambda m: m["tokenizers"]["clip"].update(file="../tokenizer.json"),
                               "tokenizers.clip.file"),
    "graph input role unknown": (lambda m: m.setdefault("graphs", {}).update(
        {B.IMAGE_ENCODER: {"inputs": {"photo": "pixel_values"}}}), "graphs.image_encoder.onnx.inputs"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_are_refused_in_one_line_naming_the_key(tiny_bundle, tmp_path, case):
    damage, key = MALFORMED[case]
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    replaced = damage(manifest)
    write_manifest_json(bundle, replaced if isinstance(replaced, list) else manifest)
    with pytest.raises(B.BundleError) as error:
        B.load_bundle(bundle, verify=False)
    assert key in one_line(error)


def test_the_cli_refuses_a_huge_image_size_before_decoding_anything(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    manifest = manifest_of(bundle)
    manifest["image"]["size"] = 100_000
    write_manifest_json(bundle, manifest)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=1)))
    env = uclip_env(tmp_path / "home", bundle=bundle, index=tmp_path / "index")
    message = run_uclip(["index", photos, "--no-progress"], env).one_line_error()
    assert "image.size" in message and "100000" in message and "pull or export" in message
    assert not (tmp_path / "index").exists()


def test_a_listed_file_that_links_outside_the_bundle_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    outside = tmp_path / "elsewhere.json"
    shutil.copy(bundle / B.TOKENIZER_CLIP, outside)
    (bundle / B.TOKENIZER_CLIP).unlink()
    (bundle / B.TOKENIZER_CLIP).symlink_to(outside)   # same bytes, same checksum: only the place is wrong
    with pytest.raises(B.BundleError) as error:
        B.load_bundle(bundle, verify=False)
    assert B.TOKENIZER_CLIP in one_line(error) and "outside the bundle" in one_line(error)


def test_every_file_the_runtime_loads_goes_through_the_manifest(tiny_bundle):
    bundle = B.load_bundle(tiny_bundle, verify="none")
    with pytest.raises(B.BundleError, match="does not list head_a.onnx"):
        bundle.file(B.HEAD_A)


def test_a_tampered_tokenizer_is_caught_when_it_is_loaded(tiny_bundle, tmp_path):
    from uclip_cli.encoders import Encoders

    bundle_dir = copy_bundle(tiny_bundle, tmp_path / "bundle")
    tokenizer = bundle_dir / B.TOKENIZER_CLIP
    tokenizer.write_text(tokenizer.read_text(encoding="utf-8").replace('"a"', '"b"', 1), encoding="utf-8")
    bundle = B.load_bundle(bundle_dir, verify="cached", only=())   # nothing checked up front
    with pytest.raises(B.BundleError) as error:
        Encoders(bundle, SessionFactory(device="cpu")).clip_text_features(["a cat"])
    assert str(tokenizer) in one_line(error) and "checksum" in one_line(error)


# ---------------------------------------------------------------------------------- swapped graphs

def swap_files(bundle: Path, a: str, b: str) -> None:
    (bundle / a).rename(bundle / "swap.tmp")
    (bundle / b).rename(bundle / a)
    (bundle / "swap.tmp").rename(bundle / b)
    B.update_manifest(bundle)   # checksums re-recorded: only the graphs' inputs and outputs can tell


@pytest.mark.parametrize("a, b", [(B.IMAGE_ENCODER, B.TEXT_MULTILINGUAL), (B.TEXT_CLIP, B.TEXT_MULTILINGUAL)])
def test_swapped_graphs_are_refused_when_their_session_is_created(tiny_bundle, tmp_path, monkeypatch, a, b):
    from uclip_cli.encoders import Encoders

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle_dir = copy_bundle(tiny_bundle, tmp_path / "bundle")
    swap_files(bundle_dir, a, b)
    encoders = Encoders(B.load_bundle(bundle_dir), SessionFactory(device="cpu", threads=1))
    for graph in (a, b):
        with pytest.raises(GraphMismatchError) as error:
            encoders.model(graph)
        assert str(bundle_dir / graph) in one_line(error) and "swapped" in one_line(error)


def test_swapped_graphs_end_the_cli_in_one_line(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    swap_files(bundle, B.IMAGE_ENCODER, B.TEXT_MULTILINGUAL)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=1)))
    env = uclip_env(tmp_path / "home", bundle=bundle, index=tmp_path / "index")
    message = invoke_uclip(["index", photos, "--no-progress"], env).one_line_error()
    assert str(bundle / B.IMAGE_ENCODER) in message


# ---------------------------------------------------------------------------------- bit rot

def rot_in_place(path: Path) -> None:
    """One bit flipped inside a float weight, size, mtime and inode kept: what the (path, size, mtime, inode)
    cache cannot see."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def test_bit_rot_behind_the_checksum_cache_is_caught_by_index(tiny_bundle, tmp_path, monkeypatch):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=1)))
    env = uclip_env(tmp_path / "home", bundle=bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()   # the checksum cache now knows the good file
    rot_in_place(bundle / B.IMAGE_ENCODER)
    (photos / "b.jpg").write_bytes(jpeg_bytes(photo_like(64, 96, seed=2)))
    message = invoke_uclip(["index", photos, "--no-progress"], env).one_line_error()
    assert str(bundle / B.IMAGE_ENCODER) in message and "checksum" in message
    # The full hash also put the file's true sha256 into the cache: the cheap check of read-only queries,
    # which alone could not have seen the change, now refuses the file as well.
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    with pytest.raises(B.BundleError, match="does not match its checksum"):
        B.load_bundle(bundle, verify="cached", only=(B.IMAGE_ENCODER,))


def test_bit_rot_in_the_optimised_copy_is_not_used_by_commands_that_write_vectors(tiny_bundle, tmp_path, monkeypatch):
    import onnxruntime as ort

    from uclip_cli.filecache import DerivedFolder
    from uclip_cli.sessions import OPTIMIZED_CACHE

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    graph = tiny_bundle / B.IMAGE_ENCODER
    SessionFactory(device="cpu", threads=1).create(graph)          # writes the optimised copy
    folder = DerivedFolder.of(OPTIMIZED_CACHE, graph, ort.__version__)
    weights = folder.file("model.onnx.data")
    good = weights.read_bytes()
    rot_in_place(weights)
    assert folder.ready() and not folder.ready(thorough=True)      # sizes cannot see it, the recorded sha256 can
    model = SessionFactory(device="cpu", threads=1).create(graph)  # not one-shot: thorough, so the copy is rebuilt
    assert Path(model.session._model_path) == folder.file("model.onnx")
    assert weights.read_bytes() == good and folder.ready(thorough=True)


# ---------------------------------------------------------------------------------- telemetry

def test_onnxruntime_writes_no_telemetry_id_into_the_users_folders(tiny_bundle, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in uclip_env(home, bundle=tiny_bundle).items()
           if k not in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")}   # as a user's shell has it
    env["HOME"] = str(home)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=1)))
    run_uclip(["index", photos, "--no-progress", "--index", tmp_path / "index"], env).ok()
    run_uclip(["query", "a cat", "--index", tmp_path / "index"], env).ok()
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert not [p for p in written if "Microsoft" in p or "onnxruntime" in p.lower()], written


# ---------------------------------------------------------------------------------- random damage

def test_random_damage_to_any_bundle_file_is_refused_in_one_line_or_harmless(tiny_bundle, tmp_path, monkeypatch):
    """Bytes flipped, truncated or appended in the manifest or any listed file: load_bundle + first use of every
    file either succeeds with the original content or raises one BundleError line; never another exception."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    names = [B.MANIFEST, *sorted(B.load_bundle(tiny_bundle).files)]
    for trial in range(60):
        bundle = copy_bundle(tiny_bundle, tmp_path / f"b{trial}")
        target = bundle / names[trial % len(names)]
        data = bytearray(target.read_bytes())
        how = ("flip", "truncate", "append")[rng.integers(3)]
        if how == "flip":
            for at in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[at] ^= 1 << int(rng.integers(8))
        elif how == "truncate":
            del data[int(rng.integers(0, len(data))):]
        else:
            data += rng.bytes(int(rng.integers(1, 64)))
        target.write_bytes(bytes(data))
        try:
            loaded = B.load_bundle(bundle, verify="full")
        except B.BundleError as e:
            assert "\n" not in str(e) and (target.name in str(e) or B.MANIFEST in str(e)), (how, target.name, str(e))
        else:   # only a manifest change that keeps it valid (e.g. whitespace, a digit of a number) can load
            assert target.name == B.MANIFEST, (how, target.name)
            assert loaded.files == B.load_bundle(tiny_bundle).files
            from uclip_cli.encoders import Encoders

            encoders = Encoders(loaded, SessionFactory(device="cpu", threads=1))
            for graph in (B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL):
                try:
                    encoders.model(graph)   # a changed dimension is caught here
                except GraphMismatchError as e:
                    assert "\n" not in str(e)
        shutil.rmtree(bundle)

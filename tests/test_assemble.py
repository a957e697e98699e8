"""The default model assembles itself on first use: published towers from a stand-in hub, heads fitted here.

The stand-in serves the two real repos' layouts (tests/published_towers.py: immich's OpenCLIP export and
sentence-transformers' ONNX export, their exact file names, graph inputs/outputs and dtypes, tokenizer and
preprocessing files) with tiny random weights, through the real hub's HTTP behaviour (tests/fake_hub.py: LFS
files redirected to a CDN with X-Linked-Etag, small files with their git blob ETag). The recipe under test is
uclip's own default_model.json with only the pins (commit, sha256, size) replaced by the stand-in's.
"""
from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import NO_HUB, environment, run_uclip, uclip_env
from fake_hub import FakeHub, Server
from published_towers import IMMICH_REPO, LFS_SUFFIXES, SENTENCE_REPO, repo_files, write_published_repos
from uclip_cli import bundle as B
from uclip_cli.assemble import AssemblyError, ModelRecipe, ensure_default_bundle
from uclip_cli.sessions import SessionFactory


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    folders = write_published_repos(tmp_path_factory.mktemp("published"))
    return {repo: repo_files(folder) for repo, folder in folders.items()}


def default_recipe_dict() -> dict:
    return json.loads(resources.files("uclip_cli").joinpath("default_model.json").read_text(encoding="utf-8"))


def stand_in(published: dict[str, dict[str, bytes]]) -> tuple[FakeHub, dict]:
    """A hub serving the published repos, and the default recipe with its pins moved to what that hub serves."""
    hub = FakeHub()
    commits = {repo: hub.publish_files(repo, files, lfs_suffixes=LFS_SUFFIXES) for repo, files in published.items()}
    recipe = default_recipe_dict()
    for tower in recipe["towers"]:
        tower["revision"] = commits[tower["repo"]]
        for path, pin in tower["files"].items():
            data = published[tower["repo"]][path]
            if "sha256" in pin:
                pin["sha256"] = hashlib.sha256(data).hexdigest()
            if "size" in pin:
                pin["size"] = len(data)
    return hub, recipe


def light(recipe: dict) -> dict:
    """The recipe with fewer captions per language: for tests about downloading and installing, not the fit."""
    return {**recipe, "heads": {**recipe.get("heads", {}), "foreign_per_language": 10}}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    env = uclip_env(tmp_path / "home")
    for key in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "HF_ENDPOINT"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


def assemble(destination: Path, recipe: dict, messages: list[str] | None = None) -> bool:
    log = messages.append if messages is not None else (lambda m: None)
    return ensure_default_bundle(destination, SessionFactory(device="cpu", threads=1),
                                 recipe=ModelRecipe.from_dict(recipe), progress=False, log=log)


def test_the_recipe_under_test_is_the_default_recipe_with_other_pins(published):
    _, recipe = stand_in(published)
    default = default_recipe_dict()
    assert [(t["repo"], t["layout"], sorted(t["files"])) for t in recipe["towers"]] == \
           [(t["repo"], t["layout"], sorted(t["files"])) for t in default["towers"]]
    assert {t["repo"] for t in default["towers"]} == {IMMICH_REPO, SENTENCE_REPO}
    assert all(len(t["revision"]) == 40 for t in default["towers"])
    pinned = {(t["repo"], p) for t in default["towers"] for p, pin in t["files"].items() if "sha256" in pin}
    assert {(IMMICH_REPO, "visual/model.onnx"), (IMMICH_REPO, "textual/model.onnx"),
            (SENTENCE_REPO, "onnx/model.onnx"), (SENTENCE_REPO, "tokenizer.json")} <= pinned


def test_first_use_assembles_towers_and_closed_form_heads_that_answer_any_language(published, home):
    hub, recipe = stand_in(published)
    destination = home / "data" / "uclip" / "bundle"
    messages: list[str] = []
    with Server(hub) as url:
        import os
        os.environ["HF_ENDPOINT"] = url
        assert assemble(destination, recipe, messages)
        assert not assemble(destination, recipe)        # installed: nothing more to do, no request made
    assert not any("armnn" in r or "qint8" in r for r in hub.requests)   # only the files uclip uses
    assert "assembling the default model" in messages[0] and "MB" in messages[0]
    bundle = B.load_bundle(destination, verify="full")
    assert bundle.has_heads and bundle.has_clip_text and bundle.dims == {"clip": 512, "multilingual": 384, "shared": 512}
    m = bundle.manifest
    # the graphs' own names, types and fixed batch, read from the graphs
    assert m["graphs"][B.IMAGE_ENCODER] == {"inputs": {"pixels": "image"}, "output": "embedding", "batch": 1}
    assert m["graphs"][B.TEXT_CLIP] == {"inputs": {"input_ids": "text"}, "output": "embedding", "ids": "int32", "batch": 1}
    assert m["graphs"][B.TEXT_MULTILINGUAL] == {
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"},
        "output": "last_hidden_state", "pooling": "mean"}
    assert bundle.image.to_dict() == {"size": 224, "resize_mode": "shortest_edge", "crop": True, "resample": "bicubic",
                                      "rescale_factor": 1 / 255, "mean": [0.48145466, 0.4578275, 0.40821073],
                                      "std": [0.26862954, 0.26130258, 0.27577711]}
    assert bundle.tokenizers["clip"].max_length == 77 and bundle.tokenizers["clip"].padding == "max_length"
    assert bundle.tokenizers["multilingual"].max_length == 128 and bundle.tokenizers["multilingual"].pad_id == 1
    # every file pinned: repo, commit and the sha256 of what was installed
    assembled = m["export"]["assembled"]
    towers = {t["repo"]: t for t in recipe["towers"]}
    for key, pin in assembled["files"].items():
        assert pin["revision"] == towers[pin["repo"]]["revision"]
        assert pin["sha256"] == hashlib.sha256(published[pin["repo"]][pin["path"]]).hexdigest()
        if pin["bundle_file"]:
            assert m["files"][pin["bundle_file"]] == pin["sha256"]   # the published file itself, byte for byte
    # heads: the closed form, 35 languages in the removed subspace, checked against their exact function
    training = m["training"]
    assert training["sizes"]["captions"] == 1800 and len(training["foreign_languages"]) == 35
    assert training["start"]["language_directions"] == 36
    assert all(p["max_abs_diff"] <= p["bound"] for p in training["onnx_parity"].values())
    assert training["encoders"][B.TEXT_MULTILINGUAL] == m["files"][B.TEXT_MULTILINGUAL]


def test_an_interrupted_download_resumes_where_it_stopped(published, home, monkeypatch):
    hub, recipe = stand_in(published)
    recipe = light(recipe)
    big = "onnx/model.onnx"
    hub.cut_after[big], hub.cuts[big] = 100_000, 3      # each of this run's 3 attempts gets 100,000 more bytes
    destination = home / "bundle"
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(AssemblyError, match="cannot be downloaded: downloading .*onnx/model.onnx failed"):
            assemble(destination, recipe)
        assert not destination.exists()
        part = destination.parent / ".bundle.assembling" / "bundle" / (B.TEXT_MULTILINGUAL + ".part")
        assert part.stat().st_size == 300_000 and len(published[SENTENCE_REPO][big]) > 300_000
        sha = hashlib.sha256(published[SENTENCE_REPO][big]).hexdigest()
        assert hub.requests.count(f"GET /cdn/{sha}") == 3
        assert assemble(destination, recipe)
    assert hub.resumed[-1] == (big, 300_000)             # the second run asked for the rest only
    assert B.load_bundle(destination, verify="full").has_heads
    assert hub.requests.count(f"GET /cdn/{sha}") == 4


@pytest.mark.parametrize("repo, path, pinned", [
    (SENTENCE_REPO, "onnx/model.onnx", True),             # sha256 pinned, the hub announces the pinned one
    (IMMICH_REPO, "textual/tokenizer.json", False),       # no sha256 pin: checked against the hub's git hash
])
def test_a_changed_file_is_refused_and_nothing_is_installed(published, home, monkeypatch, repo, path, pinned):
    hub, recipe = stand_in(published)
    data = published[repo][path]
    hub.tamper(repo, path, data[:-10] + bytes(10))
    destination = home / "bundle"
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(B.UclipError) as failure:
            assemble(destination, recipe)
    message = str(failure.value)
    assert repo in message and path in message and "nothing was installed" in message and "\n" not in message
    assert ("pinned" in message) == pinned
    assert not destination.exists()


def test_a_hub_that_announces_another_file_is_refused_before_downloading_it(published, home, monkeypatch):
    hub, recipe = stand_in(published)
    for tower in recipe["towers"]:
        if tower["repo"] == SENTENCE_REPO:
            tower["files"]["onnx/model.onnx"]["sha256"] = "0" * 64
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(B.UclipError, match="onnx/model.onnx: the hub's file has sha256 .*not the pinned 000000000000"):
            assemble(home / "bundle", recipe)
    sha = hashlib.sha256(published[SENTENCE_REPO]["onnx/model.onnx"]).hexdigest()
    assert f"GET /cdn/{sha}" not in hub.requests


def test_a_missing_file_is_one_line_naming_repo_and_path(published, home, monkeypatch):
    hub, recipe = stand_in(published)
    hub.remove(SENTENCE_REPO, "1_Pooling/config.json")
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(B.UclipError, match=f"{SENTENCE_REPO} has no 1_Pooling/config.json at commit"):
            assemble(home / "bundle", recipe)
    assert not (home / "bundle").exists()


def test_an_optional_file_the_repo_lacks_is_replaced_by_its_default(published, home, monkeypatch):
    """Older immich exports have no textual/tokenizer_config.json: the end token pads, as immich pads."""
    from tokenizers import Tokenizer

    hub, recipe = stand_in(published)
    hub.remove(IMMICH_REPO, "textual/tokenizer_config.json")
    messages: list[str] = []
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assemble(home / "bundle", light(recipe), messages)
    bundle = B.load_bundle(home / "bundle")
    end = Tokenizer.from_file(str(bundle.path / B.TOKENIZER_CLIP)).token_to_id("<|endoftext|>")
    assert bundle.tokenizers["clip"].pad_id == end and bundle.has_heads
    assert any("textual/tokenizer_config.json is not published" in m for m in messages)


def test_a_fit_interrupted_after_the_towers_are_installed_finishes_without_downloading_again(published, home, monkeypatch):
    from uclip_cli import default_heads

    hub, recipe = stand_in(published)
    recipe = light(recipe)
    destination = home / "bundle"
    real = default_heads.fit_heads

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(default_heads, "fit_heads", interrupted)
        with pytest.raises(KeyboardInterrupt):
            assemble(destination, recipe)
        manifest = B.read_manifest(destination)
        assert B.assembled_without_heads(manifest) and B.needs_assembly(destination)
        monkeypatch.setattr(default_heads, "fit_heads", real)
        downloads = len(hub.requests)
        assert assemble(destination, recipe)
        assert len(hub.requests) == downloads
    assert B.load_bundle(destination).has_heads and not B.needs_assembly(destination)


def test_manifest_graph_settings_are_validated(published, home, monkeypatch):
    hub, recipe = stand_in(published)
    recipe = light(recipe)
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assemble(home / "bundle", recipe)
    for graph, key, value, complaint in ((B.TEXT_CLIP, "ids", "int16", "must be one of int64, int32"),
                                         (B.IMAGE_ENCODER, "batch", 2, "from 1 to 1"),
                                         (B.IMAGE_ENCODER, "pooling", "mean", "text towers only")):
        manifest = B.read_manifest(home / "bundle")
        manifest["graphs"][graph][key] = value
        with pytest.raises(B.BundleError, match=complaint):
            B.validate_manifest(manifest, home / "bundle" / B.MANIFEST)


def test_the_runtime_feeds_and_pools_the_published_graphs_as_their_own_code_does(published, home, monkeypatch):
    """Sentence-transformers' masked mean over token embeddings, and immich's one text at a time, int32 ids padded
    to 77 with the end token: the runtime's vectors against the graphs run directly, within float32 rounding."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from uclip_cli.encoders import Encoders

    hub, recipe = stand_in(published)
    recipe = light(recipe)
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assemble(home / "bundle", recipe)
    bundle = B.load_bundle(home / "bundle")
    encoders = Encoders(bundle, SessionFactory(device="cpu", threads=1), batch_size=3)
    texts = ["Kočka spí na gauči.", "A dog runs on the beach", "Koira juoksee rannalla ja kaksi kissaa nukkuu sohvalla", "x"]
    got = encoders.multilingual_features(texts)
    graph = ort.InferenceSession(str(bundle.path / B.TEXT_MULTILINGUAL), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(bundle.path / B.TOKENIZER_MULTILINGUAL))
    u = 2.0 ** -24
    for text, vector in zip(texts, got):
        ids = np.array([tokenizer.encode(text).ids], np.int64)
        hidden = graph.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "token_type_ids": np.zeros_like(ids)})[0][0].astype(np.float64)
        mean = hidden.mean(axis=0)
        want = mean / np.linalg.norm(mean)
        bound = 4 * (len(ids[0]) + 2) * u * np.abs(hidden).mean(axis=0).max() / np.linalg.norm(mean) + 4 * u
        assert np.abs(vector - want).max() <= bound, (text, np.abs(vector - want).max(), bound)
    clip = encoders.clip_text_features(texts)                  # batches of 3 through a graph of batch 1
    textual = ort.InferenceSession(str(bundle.path / B.TEXT_CLIP), providers=["CPUExecutionProvider"])
    clip_tokenizer = Tokenizer.from_file(str(bundle.path / B.TOKENIZER_CLIP))
    end = bundle.tokenizers["clip"].pad_id
    for text, vector in zip(texts, clip):
        ids = clip_tokenizer.encode(text).ids
        padded = np.array([ids + [end] * (77 - len(ids))], np.int32)
        want = textual.run(None, {"text": padded})[0][0]
        # the same graph on the same ids; the runtime's own renormalisation of a unit vector moves it by <= 2 roundings
        np.testing.assert_allclose(vector, want, rtol=0, atol=4 * u)


# ------------------------------------------------------------------------------------------------ the CLI

def photos(folder: Path) -> Path:
    from image_fixtures import jpeg_bytes, photo_like

    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"photo{i}.jpg").write_bytes(jpeg_bytes(photo_like(320, 240, seed=i)))
    return folder


def test_offline_with_no_bundle_is_one_line_within_two_seconds(tmp_path):
    env = uclip_env(tmp_path / "home")
    folder = photos(tmp_path / "photos")
    for command, extra in ((["index", folder], {"HF_ENDPOINT": NO_HUB}), (["index", folder], {"HF_HUB_OFFLINE": "1"}),
                           (["serve", "--port", "0"], {"HF_ENDPOINT": NO_HUB})):
        started = time.monotonic()
        result = run_uclip(command, {**env, **extra}, entry_point=True)
        elapsed = time.monotonic() - started
        message = result.one_line_error()
        assert result.code == 2 and elapsed < 2.0, (result, elapsed)
        assert "uclip pull ARCHIVE" in message and "--bundle" in message and "default model" in message
    assert not (tmp_path / "home" / "data" / "uclip" / "bundle").exists()


def test_index_query_doctor_and_check_on_the_assembled_default(published, tmp_path):
    hub, recipe = stand_in(published)
    env = uclip_env(tmp_path / "home")
    folder = photos(tmp_path / "photos")
    bundle = tmp_path / "home" / "data" / "uclip" / "bundle"
    with Server(hub) as url:
        env["HF_ENDPOINT"] = url
        with environment(env):
            assemble(bundle, recipe)                       # what `uclip index` does first, with the recipe under test
        requests = len(hub.requests)
        indexed = run_uclip(["index", folder, "--no-progress"], env, timeout=300)
        assert indexed.code == 0, indexed.stderr
        assert "4 embedded" in indexed.stdout
        for words in ("kočka na gauči", "mačka na kauču", "a cat on a sofa", "猫"):
            found = run_uclip(["query", words, "--format", "json", "-n", "4"], env, timeout=120)
            assert found.code == 0, found.stderr
            result = json.loads(found.stdout)
            assert result["space"] == "shared" and len(result["results"]) == 4
            scores = [r["score"] for r in result["results"]]
            assert scores == sorted(scores, reverse=True)
        shortcut = run_uclip(["kočka na gauči", "--format", "paths"], env, timeout=120)
        assert shortcut.code == 0 and len(shortcut.stdout.splitlines()) == 4
        doctor = run_uclip(["doctor"], env, timeout=120)
        assert doctor.code == 0, doctor.stdout + doctor.stderr
        assert "heads trained on these encoders    yes" in doctor.stdout
        info = run_uclip(["bundle", "info"], env)
        assert info.code == 0 and f"clip {IMMICH_REPO}@" in info.stdout and f"multilingual {SENTENCE_REPO}@" in info.stdout
        assert "not pulled (assembled here)" in info.stdout and "foreign languages" in info.stdout
        check = run_uclip(["check"], env, timeout=120)
        assert check.code == 0, check.stdout + check.stderr
        assert len(hub.requests) == requests              # nothing more was downloaded after the assembly
    vectors = json.loads(run_uclip(["query", str(folder / "photo0.jpg"), "--format", "json"], env).stdout)
    assert vectors["kind"] == "image" and all(np.isfinite(r["score"]) for r in vectors["results"])


def test_ctrl_c_during_the_download_leaves_nothing_installed_and_the_next_run_resumes(published, home, monkeypatch):
    import signal
    import threading

    hub, recipe = stand_in(published)
    recipe = light(recipe)
    big = "onnx/model.onnx"
    hub.stall[big] = 150_000                 # sends this much, then hangs until the user gives up
    destination = home / "bundle"
    part = destination.parent / ".bundle.assembling" / "bundle" / (B.TEXT_MULTILINGUAL + ".part")

    def press_ctrl_c_when_the_download_stalls() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (part.exists() and part.stat().st_size >= 150_000):
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGINT)   # what Ctrl-C does, to the thread blocked reading the socket

    main = threading.main_thread().ident
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        threading.Thread(target=press_ctrl_c_when_the_download_stalls, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            assemble(destination, recipe)
        assert not destination.exists() and part.stat().st_size == 150_000
        del hub.stall[big]
        assert assemble(destination, recipe)
    assert hub.resumed[-1] == (big, 150_000)
    assert B.load_bundle(destination, verify="full").has_heads


def test_a_bundle_location_that_cannot_be_written_is_one_line(tmp_path):
    import os

    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):     # root ignores the mode: a file where the folder must be instead
            parent.chmod(0o700)
            (parent / "data").write_text("not a folder")
            destination = parent / "data" / "uclip" / "bundle"
        else:
            destination = parent / "bundle"
        with pytest.raises(AssemblyError, match="cannot write beside .* to assemble the default model .*pass --bundle FOLDER"):
            ensure_default_bundle(destination, SessionFactory(device="cpu"), progress=False)
    finally:
        parent.chmod(0o700)


def test_a_server_on_the_default_model_never_loads_the_tokenizer_inside_a_request(published, tmp_path, monkeypatch):
    """Issue 22, item 1: XLM-R's whole vocabulary (0.4 s at its real size) is loaded before `uclip serve` answers;
    200 distinct texts later, no request has loaded it (it used to happen inside the 65th)."""
    pytest.importorskip("starlette")
    from serve_helpers import served
    from uclip_cli import text as text_module

    hub, recipe = stand_in(published)
    env = uclip_env(tmp_path / "home")
    bundle, index = tmp_path / "bundle", tmp_path / "index"
    with Server(hub) as url:
        env["HF_ENDPOINT"] = url
        with environment(env):
            assemble(bundle, light(recipe))
    run_uclip(["index", photos(tmp_path / "photos"), "--no-progress", "--bundle", bundle, "--index", index], env).ok()
    loads = []
    real = text_module.TextTokenizer._load_full
    monkeypatch.setattr(text_module.TextTokenizer, "_load_full", lambda self: (loads.append(self.path), real(self))[1])
    with environment(env), served(index, bundle, tmp_path / "cache") as (client, library, _):
        assert loads == [bundle / B.TOKENIZER_MULTILINGUAL]          # while starting, before the first request
        for i in range(200):
            response = client.get("/api/search", params={"q": f"kočka číslo {i} na gauči", "top": 4})
            assert response.status_code == 200, response.text
            assert len(response.json()["results"]) == 4
    assert len(loads) == 1

"""The stand-ins for the two published repos (tests/published_towers.py) and the hub that serves them (tests/fake_hub.py).

The repos must have the real layouts and graph signatures, exactly; the hub must answer as the real one does:
nested paths, LFS files through a 302 to a CDN (another origin) with X-Linked-Etag / X-Linked-Size, small files
directly with their git blob sha1 as ETag, and the hub's error codes.
"""
from __future__ import annotations

import hashlib
import http.client
import json
from urllib.parse import urlsplit

import numpy as np
import pytest

from fake_hub import FakeHub, Server, git_blob_sha1
from published_towers import IMMICH_REPO, LFS_SUFFIXES, SENTENCE_REPO, repo_files, write_published_repos

IMMICH_FILES = {
    "README.md", "config.json", "visual/model.onnx", "visual/model.armnn", "visual/preprocess_cfg.json",
    "textual/model.onnx", "textual/model.armnn", "textual/tokenizer.json", "textual/tokenizer_config.json",
    "textual/special_tokens_map.json", "textual/vocab.json", "textual/merges.txt",
}
SENTENCE_FILES = {
    "README.md", "config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "onnx/model.onnx",
    "onnx/model_qint8_avx512.onnx",
}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return write_published_repos(tmp_path_factory.mktemp("published"))


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(args):
    return [(a.name, a.type, list(a.shape)) for a in args]


def _tokenizer(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


# ------------------------------------------------------------------------------------------- the repos

def test_layouts_and_small_files_are_exact(repos):
    immich, sentence = repos[IMMICH_REPO], repos[SENTENCE_REPO]
    assert set(repo_files(immich)) == IMMICH_FILES
    assert set(repo_files(sentence)) == SENTENCE_FILES
    assert (immich / "config.json").read_text() == (
        '{"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}, '
        '"text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}')
    assert json.loads((immich / "visual" / "preprocess_cfg.json").read_text())["size"] == [224, 224]
    config = json.loads((immich / "textual" / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["model_max_length"], config["tokenizer_class"]) == (
        "<|endoftext|>", 77, "CLIPTokenizer")
    assert (sentence / "sentence_bert_config.json").read_text() == (
        '{\n  "max_seq_length": 128,\n  "do_lower_case": false\n}')
    pooling = json.loads((sentence / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 384 and pooling["pooling_mode_mean_tokens"]
    assert [m["path"] for m in json.loads((sentence / "modules.json").read_text())] == ["", "1_Pooling"]
    assert json.loads((sentence / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    assert len((immich / "visual" / "model.onnx").read_bytes()) < 1 << 20
    assert len((immich / "textual" / "model.onnx").read_bytes()) < 2 << 20
    for junk in (immich / "visual" / "model.armnn", immich / "textual" / "model.armnn",
                 sentence / "onnx" / "model_qint8_avx512.onnx"):
        assert 100 < junk.stat().st_size < 1000


def test_the_same_seed_writes_the_same_bytes(repos, tmp_path):
    again = write_published_repos(tmp_path / "again")
    other = write_published_repos(tmp_path / "other", seed=1)
    for repo, folder in repos.items():
        assert repo_files(again[repo]) == repo_files(folder)
        assert repo_files(other[repo])["README.md"] == repo_files(folder)["README.md"]
    assert repo_files(other[IMMICH_REPO])["visual/model.onnx"] != repo_files(repos[IMMICH_REPO])["visual/model.onnx"]


def test_immich_graphs_have_the_export_signatures_and_see_the_image(repos):
    visual = _session(repos[IMMICH_REPO] / "visual" / "model.onnx")
    assert _signature(visual.get_inputs()) == [("image", "tensor(float)", [1, 3, 224, 224])]
    assert _signature(visual.get_outputs()) == [("embedding", "tensor(float)", [1, 512])]
    rng = np.random.default_rng(0)
    picture = np.repeat(np.repeat(rng.random((3, 28, 28), dtype=np.float32), 8, axis=1), 8, axis=2)
    other = np.repeat(np.repeat(rng.random((3, 28, 28), dtype=np.float32), 8, axis=1), 8, axis=2)

    def embed(x):
        return visual.run(None, {"image": ((x - MEAN) / STD)[None].astype(np.float32)})[0][0]

    a, b, swapped = embed(picture), embed(other), embed(picture[::-1].copy())
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    assert a @ b < 0.9 and a @ swapped < 0.9
    assert a @ embed(np.clip(picture + 0.004, 0, 1)) > 0.99


def test_immich_text_tower_pools_up_to_the_end_token(repos):
    textual = _session(repos[IMMICH_REPO] / "textual" / "model.onnx")
    assert _signature(textual.get_inputs()) == [("text", "tensor(int32)", [1, 77])]
    assert _signature(textual.get_outputs()) == [("embedding", "tensor(float)", [1, 512])]
    tokenizer = _tokenizer(repos[IMMICH_REPO] / "textual" / "tokenizer.json")
    eot = tokenizer.token_to_id("<|endoftext|>")

    def embed(text, pad):
        ids = tokenizer.encode(text).ids
        return textual.run(None, {"text": np.array([ids + [pad] * (77 - len(ids))], np.int32)})[0][0]

    cat = embed("a photo of a cat", eot)
    assert abs(np.linalg.norm(cat) - 1) < 1e-5
    assert np.allclose(cat, embed("a photo of a cat", 0), atol=1e-6)   # what follows the end token is ignored
    assert cat @ embed("a photo of a dog", eot) < 0.99
    assert cat @ embed("a photo of a", eot) < 0.99


def test_immich_tokenizer_is_clip_with_the_end_token_last(repos):
    tokenizer = _tokenizer(repos[IMMICH_REPO] / "textual" / "tokenizer.json")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    sot, eot = tokenizer.token_to_id("<|startoftext|>"), tokenizer.token_to_id("<|endoftext|>")
    assert (sot, eot) == (size - 2, size - 1)
    ids = tokenizer.encode("A  Photo of a CAT").ids
    assert ids[0] == sot and ids[-1] == eot and max(ids[1:-1]) < sot
    assert ids == tokenizer.encode("a photo of a cat").ids   # lower-cased, spaces folded
    assert tokenizer.encode("a photo of a cat").tokens[1] == "a</w>"
    vocab = json.loads((repos[IMMICH_REPO] / "textual" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|endoftext|>"] == eot and len(vocab) == size
    # the embedding table covers every id the tokenizer gives
    textual = _session(repos[IMMICH_REPO] / "textual" / "model.onnx")
    textual.run(None, {"text": np.full((1, 77), eot, np.int32)})


def test_sentence_graph_gives_unpooled_token_embeddings(repos):
    model = _session(repos[SENTENCE_REPO] / "onnx" / "model.onnx")
    dims = ["batch_size", "sequence_length"]
    assert _signature(model.get_inputs()) == [(n, "tensor(int64)", dims)
                                              for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert _signature(model.get_outputs()) == [("last_hidden_state", "tensor(float)", [*dims, 384])]
    tokenizer = _tokenizer(repos[SENTENCE_REPO] / "tokenizer.json")
    short, long = tokenizer.encode_batch(["Pes běží po pláži.", "Dvije mačke spavaju na crvenom kauču."])
    n = len(long.ids)
    ids = np.array([short.ids + [1] * (n - len(short.ids)), long.ids])
    mask = np.array([[1] * len(short.ids) + [0] * (n - len(short.ids)), [1] * n])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    out = model.run(None, feeds)[0]
    assert out.shape == (2, n, 384) and out.dtype == np.float32
    alone = model.run(None, {k: v[:1, :len(short.ids)] for k, v in feeds.items()})[0]
    assert np.allclose(alone[0], out[0, :len(short.ids)], atol=1e-5)   # padding does not leak into real tokens
    assert not np.allclose(out[0, 1], out[1, 1])
    assert not np.allclose(model.run(None, {**feeds, "token_type_ids": np.ones_like(ids)})[0], out)


def test_sentence_tokenizer_is_xlmr_and_splits_other_languages(repos):
    tokenizer = _tokenizer(repos[SENTENCE_REPO] / "tokenizer.json")
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    config = json.loads((repos[SENTENCE_REPO] / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    for text in ("Dvě kočky spí na červené pohovce.", "Kaksi kissaa nukkuu punaisella sohvalla.",
                 "Dvije mačke spavaju na crvenom kauču."):
        encoding = tokenizer.encode(text)
        assert encoding.ids[0] == 0 and encoding.ids[-1] == 2
        assert 3 not in encoding.ids and len(encoding.ids) > 8


# ------------------------------------------------------------------------------------------- the hub

def _request(url: str, method: str = "GET", headers: dict | None = None):
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, response.headers, body


@pytest.fixture(scope="module")
def served(repos):
    hub = FakeHub()
    commits = {repo: hub.publish_files(repo, repo_files(folder), lfs_suffixes=LFS_SUFFIXES)
               for repo, folder in repos.items()}
    with Server(hub) as url:
        yield hub, url, commits


def test_lfs_files_redirect_to_the_cdn_with_the_linked_etag(served, repos):
    hub, url, commits = served
    data = repo_files(repos[IMMICH_REPO])["visual/model.onnx"]
    sha = hashlib.sha256(data).hexdigest()
    for method in ("HEAD", "GET"):
        status, headers, _ = _request(f"{url}/{IMMICH_REPO}/resolve/main/visual/model.onnx", method)
        assert status == 302
        assert headers["X-Repo-Commit"] == commits[IMMICH_REPO]
        assert headers["X-Linked-Etag"] == f'"{sha}"' and headers["X-Linked-Size"] == str(len(data))
        assert headers["ETag"] and headers["ETag"] != headers["X-Linked-Etag"]
        location = headers["Location"]
        assert location.endswith(f"/cdn/{sha}") and not location.startswith(url)   # another origin, as the CDN is
    status, headers, body = _request(location)
    assert (status, body, headers["Content-Length"]) == (200, data, str(len(data)))
    status, headers, body = _request(location, headers={"Range": "bytes=1000-"})
    assert (status, body) == (206, data[1000:])
    assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    # URL-quoted path, and the commit id as revision
    status, headers, _ = _request(f"{url}/{IMMICH_REPO}/resolve/{commits[IMMICH_REPO]}/textual%2Fmodel.onnx", "HEAD")
    assert status == 302 and headers["X-Linked-Size"] == str(len(repo_files(repos[IMMICH_REPO])["textual/model.onnx"]))


def test_small_files_are_served_directly_with_their_git_blob_sha1(served, repos):
    hub, url, commits = served
    data = repo_files(repos[SENTENCE_REPO])["1_Pooling/config.json"]
    status, headers, body = _request(f"{url}/{SENTENCE_REPO}/resolve/main/1_Pooling/config.json")
    assert (status, body) == (200, data)
    blob = hashlib.sha1(b"blob " + str(len(data)).encode() + bytes(1) + data).hexdigest()
    assert headers["ETag"] == f'"{blob}"' == f'"{git_blob_sha1(data)}"'
    assert headers["X-Repo-Commit"] == commits[SENTENCE_REPO] and headers["Content-Length"] == str(len(data))
    assert f"GET /{SENTENCE_REPO}/resolve/main/1_Pooling/config.json" in hub.requests


def test_hub_error_codes(served):
    _, url, commits = served
    cases = {
        f"{url}/{IMMICH_REPO}/resolve/main/visual/missing.onnx": (404, "EntryNotFound"),
        f"{url}/{IMMICH_REPO}/resolve/v9/config.json": (404, "RevisionNotFound"),
        f"{url}/someone/nothing/resolve/main/config.json": (401, "RepoNotFound"),
    }
    for target, expected in cases.items():
        status, headers, _ = _request(target, "HEAD")
        assert (status, headers["X-Error-Code"]) == expected
    assert _request(f"{url}/{IMMICH_REPO}/resolve/main/nope.json", "HEAD")[1]["X-Repo-Commit"] == commits[IMMICH_REPO]
    assert _request(f"{url}/cdn/{'0' * 64}")[0] == 404


def test_tamper_remove_and_cuts_on_the_cdn(repos):
    hub = FakeHub(cut_after={"onnx/model.onnx": 100}, cuts={"onnx/model.onnx": 1})
    files = repo_files(repos[SENTENCE_REPO])
    commit = hub.publish_files(SENTENCE_REPO, files)
    data = files["onnx/model.onnx"]
    with Server(hub) as url:
        location = _request(f"{url}/{SENTENCE_REPO}/resolve/main/onnx/model.onnx", "HEAD")[1]["Location"]
        with pytest.raises(http.client.IncompleteRead):   # the first GET is cut after 100 bytes
            _request(location)
        assert _request(location, headers={"Range": "bytes=100-"})[2] == data[100:]
        hub.tamper(SENTENCE_REPO, "onnx/model.onnx", b"not a model")
        status, headers, _ = _request(f"{url}/{SENTENCE_REPO}/resolve/main/onnx/model.onnx", "HEAD")
        assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"' and headers["X-Repo-Commit"] == commit
        assert _request(location)[2] == b"not a model"
        hub.tamper(SENTENCE_REPO, "modules.json", b"[]")
        status, headers, body = _request(f"{url}/{SENTENCE_REPO}/resolve/main/modules.json")
        assert body == b"[]" and headers["ETag"] == f'"{git_blob_sha1(files["modules.json"])}"'
        hub.remove(SENTENCE_REPO, "onnx/model.onnx")
        status, headers, _ = _request(f"{url}/{SENTENCE_REPO}/resolve/main/onnx/model.onnx", "HEAD")
        assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
        assert _request(location)[0] == 404


def test_hf_hub_download_follows_the_cdn_redirect(served, repos, tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub, url, commits = served
    files = repo_files(repos[IMMICH_REPO])
    for name in ("visual/model.onnx", "textual/tokenizer.json"):
        path = hf.hf_hub_download(IMMICH_REPO, name, endpoint=url, cache_dir=tmp_path)
        assert open(path, "rb").read() == files[name]
        assert f"/snapshots/{commits[IMMICH_REPO]}/{name}" in path.replace("\\", "/")
    assert any(r.startswith("GET /cdn/") for r in hub.requests)   # the bytes came from the CDN origin
    assert not any(r.startswith("HEAD /cdn/") for r in hub.requests)   # the HEAD kept the hub's redirect headers
    assert not any(".armnn" in r for r in hub.requests)


def test_resolve_cache_redirect_for_small_files(repos, tmp_path, monkeypatch):
    hub = FakeHub(resolve_cache=True)
    files = repo_files(repos[SENTENCE_REPO])
    commit = hub.publish_files(SENTENCE_REPO, files)
    with Server(hub) as url:
        status, headers, _ = _request(f"{url}/{SENTENCE_REPO}/resolve/main/1_Pooling/config.json", "HEAD")
        assert (status, headers["X-Repo-Commit"]) == (307, commit)
        assert headers["Location"] == f"/api/resolve-cache/models/{SENTENCE_REPO}/{commit}/1_Pooling/config.json"
        status, headers, body = _request(url + headers["Location"])
        assert (status, body) == (200, files["1_Pooling/config.json"])
        assert headers["ETag"] == f'"{git_blob_sha1(body)}"'
        assert _request(f"{url}/{SENTENCE_REPO}/resolve/main/onnx/model.onnx", "HEAD")[0] == 302   # LFS: unchanged
        hf = pytest.importorskip("huggingface_hub")
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        path = hf.hf_hub_download(SENTENCE_REPO, "1_Pooling/config.json", endpoint=url, cache_dir=tmp_path)
        assert open(path, "rb").read() == files["1_Pooling/config.json"]

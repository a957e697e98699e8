"""`uclip serve`'s JSON API with the app in this process (Starlette's test client) over the tiny bundle:
results against float64 references, paging and filters, thumbnails, hostile requests, host and token
checks, and an index that changes under a running server."""
from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from cli_helpers import index_records, index_vectors, invoke_uclip, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, make_photo_folder, photo_like
from rounding import U32, assert_within, dot_bound
from serve_helpers import bundle_with_heads, environment, listening, needs, served

needs("starlette", "the serve extra: pip install '.[serve]'")

CZECH = "pes na pláži"


@dataclass(frozen=True)
class World:
    home: Path
    photos: Path
    index: Path
    bundle: Path
    env: dict
    good: list[str]          # relative paths of the indexed photos
    rotated: str


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bundle) -> World:
    home = tmp_path_factory.mktemp("serve_home")
    photos = (home / "photos").resolve()
    layout = make_photo_folder(photos)
    bundle = bundle_with_heads(tiny_bundle, home / "bundle")
    env = uclip_env(home, bundle=bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    return World(home, photos, home / "index", bundle, env, layout["good"], layout["rotated"])


@pytest.fixture(scope="module")
def app(world):
    with environment(world.env), served(world.index, world.bundle, world.home / "cache") as running:
        yield running


@pytest.fixture
def client(app):
    return app[0]


def ok(response) -> dict:
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


def reference_scores(world: World, query: np.ndarray) -> dict[str, float]:
    return {path: float(v.astype(np.float64) @ query.astype(np.float64)) for path, v in index_vectors(world.index).items()}


def score_bound(d: int) -> float:
    # canonical score (one float32 rounding of a float64 sum), then 6 decimals in JSON
    return U32 + 5e-7


# ---------------------------------------------------------------------------- search


def test_search_scores_every_photo_against_the_query_vector(world, app):
    client, library, _ = app
    out = ok(client.get("/api/search", params={"q": CZECH, "top": 100}))
    assert out["space"] == "shared" and out["query"]["kind"] == "text" and not out["more"]
    with library.use() as state:
        query = state.heads.text_vectors([CZECH])[0]        # the vector this search used (cached)
    reference = reference_scores(world, query)
    got = {r["path"]: r["score"] for r in out["results"]}
    assert set(got) == {str(world.photos / p) for p in world.good}
    for path, score in got.items():
        assert_within(score, reference[path], score_bound(len(query)), path)
    ranked = [reference[r["path"]] for r in out["results"]]
    assert all(a >= b - 2 * U32 for a, b in zip(ranked, ranked[1:]))
    records = index_records(world.index)
    for r in out["results"]:
        assert r["id"] == records[r["path"]].content_hash
        assert r["thumb"] == f"/thumb/{r['id']}" and r["image"] == f"/image/{r['id']}"
        assert r["name"] == Path(r["path"]).name and r["paths"][0] == r["path"]


def test_search_finds_what_uclip_query_finds(world, client):
    cli = json.loads(invoke_uclip(["query", CZECH, "--format", "json", "--top", "5"], world.env).ok().stdout)
    api = ok(client.get("/api/search", params={"q": CZECH, "top": 5}))
    assert {r["path"] for r in api["results"]} == {r["path"] for r in cli["results"]}
    assert [r["id"] for r in api["results"]] == [r["id"] for r in cli["results"]]


def test_pages_join_up_to_the_whole_ranking(client):
    whole = ok(client.get("/api/search", params={"q": "a red boat", "top": 100}))["results"]
    pages, offset, more = [], 0, True
    while more:
        page = ok(client.get("/api/search", params={"q": "a red boat", "top": 4, "offset": offset}))
        assert page["offset"] == offset
        pages += page["results"]
        offset += 4
        more = page["more"]
    assert [r["id"] for r in pages] == [r["id"] for r in whole]


def test_terms_over_http_name_photos_by_id_never_by_path(world, client):
    records = index_records(world.index)
    beach = records[str(world.photos / "beach.jpg")].content_hash
    out = ok(client.get("/api/search", params={"q": f'id:{beach} + 2:"a dog"', "top": 100}))
    assert out["query"]["kind"] == "combined" and out["query"]["read_as"] == f'id:{beach} + 2:"a dog"'
    assert beach not in [r["id"] for r in out["results"]]                  # the example itself is left out
    assert len(out["results"]) == len(world.good) - 1
    for q in [str(world.photos / "beach.jpg"), "./beach.jpg", "a + ../../etc/passwd.png"]:
        assert "by id" in one_line_error(client.get("/api/search", params={"q": q}), 400)


def test_similar_is_more_like_this_photo_without_it(world, client):
    vectors = index_vectors(world.index)
    records = index_records(world.index)
    path = str(world.photos / "portrait.jpeg")
    out = ok(client.get(f"/api/similar/{records[path].content_hash}", params={"top": 100}))
    assert out["query"] == {"similar": records[path].content_hash, "kind": "image"}
    reference = reference_scores(world, vectors[path])
    got = {r["path"]: r["score"] for r in out["results"]}
    assert set(got) == {str(world.photos / p) for p in world.good} - {path}
    for p, score in got.items():
        assert_within(score, reference[p], dot_bound(vectors[p], vectors[path]) + score_bound(0), p)


def test_folder_filter_and_min_score(world, client):
    albums = world.photos / "albums"
    inside = ok(client.get("/api/search", params={"q": "a cat", "in": str(albums), "top": 100}))["results"]
    assert inside and {r["path"] for r in inside} == {str(world.photos / p) for p in world.good if p.startswith("albums/")}
    scores = [r["score"] for r in ok(client.get("/api/search", params={"q": "a cat", "top": 100}))["results"]]
    cut = (scores[2] + scores[3]) / 2
    kept = ok(client.get("/api/search", params={"q": "a cat", "top": 100, "min_score": f"{cut:.7f}"}))["results"]
    assert [r["score"] for r in kept] == scores[:3]
    none = ok(client.get("/api/search", params={"q": "a cat", "min_score": f"{scores[0] + 0.01:.6f}"}))
    assert none["results"] == [] and none["more"] is False


def test_status_says_what_is_served(world, client):
    status = ok(client.get("/api/status"))
    assert status["index"]["photos"] == len(world.good) and status["index"]["roots"] == [str(world.photos)]
    assert status["index"]["skipped"] > 0
    assert status["bundle"]["heads_trained"] is True and status["bundle"]["space"] == "shared"
    assert status["bundle"]["path"] == str(world.bundle)
    assert any("CPUExecutionProvider" in providers for providers in status["providers"].values())
    assert status["notes"] == []


def test_untrained_bundle_says_other_languages_need_training(world, tiny_bundle, tmp_path):
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    invoke_uclip(["index", world.photos / "albums", "--no-progress"], env).ok()
    with environment(env), served(tmp_path / "index", tiny_bundle, tmp_path / "cache") as (client, _, _):
        status = ok(client.get("/api/status"))
        assert status["bundle"]["heads_trained"] is False and status["bundle"]["space"] == "clip"
        assert any("uclip train" in note for note in status["notes"])
        out = ok(client.get("/api/search", params={"q": "a cat"}))
        assert out["space"] == "clip" and out["results"] and any("uclip train" in n for n in out["notes"])


def test_status_of_an_index_moved_while_serving_is_a_one_line_503(world, tmp_path):
    """Issue 19 item 8: the index folder moved (or deleted) under a running server made /api/status a 500 (the
    stats listed a folder that was gone). Now: 503 naming what happened, searches still answer from the
    snapshot held open, and the status comes back once the folder is back."""
    index = tmp_path / "index"
    shutil.copytree(world.index, index)
    with environment(world.env), served(index, world.bundle, tmp_path / "cache") as (client, library, _):
        assert ok(client.get("/api/status"))["index"]["photos"] == len(world.good)
        index.rename(tmp_path / "moved")
        says = one_line_error(client.get("/api/status"), 503)
        assert "gone" in says and "--index" in says and str(index) in says
        assert ok(client.get("/api/search", params={"q": "a cat"}))["results"]
        with library.use() as state, state.lock:        # the race itself: the folder vanishes while it is listed
            stats = state.store.stats()
        assert stats.ok == len(world.good) and stats.bytes_on_disk == 0
        (tmp_path / "moved").rename(index)
        assert ok(client.get("/api/status"))["index"]["photos"] == len(world.good)


# ---------------------------------------------------------------------------- thumbnails and photos


def decoded(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_thumbnails_are_small_upright_and_cached_by_content(world, app):
    client, _, thumbnails = app
    records = index_records(world.index)
    for relative in world.good:
        photo = Image.open(world.photos / relative)
        response = client.get(f"/thumb/{records[str(world.photos / relative)].content_hash}")
        assert response.headers["content-type"] == "image/jpeg"
        thumb = decoded(response)
        assert thumb.format == "JPEG" and max(thumb.size) == min(256, max(photo.size)), relative
    rotated = decoded(client.get(f"/thumb/{records[str(world.photos / world.rotated)].content_hash}"))
    assert rotated.size[1] > rotated.size[0]          # stored 300x200 with EXIF orientation 6: shown upright

    beach = records[str(world.photos / "beach.jpg")].content_hash
    cached = thumbnails.file(beach, 256)
    assert cached.is_file() and cached.parent.name == beach[:2]
    made = thumbnails.made
    first = client.get(f"/thumb/{beach}").content
    assert thumbnails.made == made                      # served from the disk cache
    shutil.rmtree(thumbnails.folder)                    # derived data: losing it costs time only
    assert client.get(f"/thumb/{beach}").content == first and thumbnails.made == made + 1


def test_big_jpegs_are_decoded_at_reduced_scale(world, app, tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    from uclip_cli.serve.originals import IndexedFile, IndexedPhoto

    client, _, thumbnails = app
    ramp = np.linspace(0, 255, 2400, dtype=np.float32)
    big = Image.fromarray(np.stack([np.tile(ramp, (1600, 1)), np.tile(ramp[:1600, None], (1, 2400)),
                                    np.full((1600, 2400), 90.0)], axis=-1).astype(np.uint8))
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(big))
    st = (tmp_path / "big.jpg").stat()
    made = thumbnails.make(IndexedPhoto("ab" * 16, (IndexedFile(str(tmp_path / "big.jpg"), st.st_size, st.st_mtime_ns),),
                                        (str(tmp_path),)), 256)
    assert drafts[0] == (600, 400)                      # decoded at 1/4 scale: the short side stays >= 256
    assert Image.open(made).size == (256, 171)


def test_image_serves_the_original_or_a_jpeg_of_it(world, client):
    records = index_records(world.index)
    beach = world.photos / "beach.jpg"
    response = client.get(f"/image/{records[str(beach)].content_hash}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == beach.read_bytes()
    assert response.headers["content-length"] == str(beach.stat().st_size)
    tiff = world.photos / "scans/page.tiff"
    converted = decoded(client.get(f"/image/{records[str(tiff)].content_hash}"))
    assert converted.format == "JPEG" and converted.size == Image.open(tiff).size   # below 2048 px: full size


def test_heic_thumbnail_with_the_heif_extra(world, client):
    needs("pillow_heif", "HEIC needs the heif extra: pip install '.[heif]'")
    heic = [p for p in world.good if p.endswith(".heic")]
    assert heic, "the fixture folder holds a HEIC photo wherever pillow-heif can write one"
    records = index_records(world.index)
    thumb = decoded(client.get(f"/thumb/{records[str(world.photos / heic[0])].content_hash}"))
    assert max(thumb.size) == 256


def test_a_photo_replaced_by_a_fifo_is_refused_not_read(tmp_path, tiny_bundle):
    """A file swapped for a FIFO after indexing would hang a plain open() + read() forever."""
    import os

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=1)))
    (photos / "b.jpg").write_bytes(jpeg_bytes(photo_like(80, 60, seed=2)))
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    content_id = index_records(tmp_path / "index")[str(photos / "a.jpg")].content_hash
    (photos / "a.jpg").unlink()
    os.mkfifo(photos / "a.jpg")
    with environment(env), served(tmp_path / "index", tiny_bundle, tmp_path / "cache") as (client, _, _):
        assert "cannot" in one_line_error(client.get(f"/image/{content_id}"), 404)
        assert "cannot" in one_line_error(client.get(f"/thumb/{content_id}"), 404)


def test_only_the_indexed_content_is_served_never_what_a_path_leads_to_now(tmp_path, tiny_bundle):
    """Issue 19 item 5: /image served whatever the indexed path led to now: a photo replaced by a symlink to a
    secret file came back as image/jpeg. Now a file is sent (or thumbnailed) only while it is inside the indexed
    folders, still the indexed content (size, mtime, else the content hash) and an image."""
    import os

    home = tmp_path.resolve()
    photos = home / "photos"
    photos.mkdir()
    for i, name in enumerate(["linked.jpg", "swapped.jpg", "kept.jpg", "touched.jpg", "texted.jpg", "lookalike.jpg"]):
        (photos / name).write_bytes(jpeg_bytes(photo_like(96, 64, seed=i)))
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    records = index_records(home / "index")
    ids = {Path(path).name: record.content_hash for path, record in records.items()}
    kept = (photos / "kept.jpg").read_bytes()

    secret = home / "id_ed25519"                 # outside the indexed folder
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (photos / "linked.jpg").unlink()
    (photos / "linked.jpg").symlink_to(secret)
    (photos / "swapped.jpg").write_bytes(jpeg_bytes(photo_like(200, 150, seed=99)))     # other content, other size
    os.utime(photos / "touched.jpg", ns=(0, 10**18))                                     # same bytes, new mtime
    texted = records[str(photos / "texted.jpg")]                 # same size and mtime as indexed, but text
    (photos / "texted.jpg").write_bytes(b"x" * texted.size)
    os.utime(photos / "texted.jpg", ns=(texted.mtime_ns, texted.mtime_ns))
    lookalike = records[str(photos / "lookalike.jpg")]           # a file outside made to look as indexed
    (home / "lookalike.jpg").write_bytes((photos / "lookalike.jpg").read_bytes()[:16] + b"s" * (lookalike.size - 16))
    os.utime(home / "lookalike.jpg", ns=(lookalike.mtime_ns, lookalike.mtime_ns))
    (photos / "lookalike.jpg").unlink()
    (photos / "lookalike.jpg").symlink_to(home / "lookalike.jpg")

    with environment(env), served(home / "index", tiny_bundle, home / "cache") as (client, _, thumbnails):
        for name, says in [("linked.jpg", "outside the indexed folders"), ("lookalike.jpg", "outside the indexed folders"),
                           ("swapped.jpg", "changed since it was indexed"), ("texted.jpg", "not an image")]:
            for route in ("image", "thumb"):
                response = client.get(f"/{route}/{ids[name]}")
                assert says in one_line_error(response, 404) and "run `uclip index`" in response.json()["error"], name
                assert b"secret" not in response.content and str(home) not in response.text
            assert thumbnails.cached(ids[name], 256) is None     # nothing cached under the photo's id
        response = client.get(f"/image/{ids['kept.jpg']}")
        assert response.status_code == 200 and response.content == kept and response.headers["content-type"] == "image/jpeg"
        assert decoded(client.get(f"/thumb/{ids['kept.jpg']}")).format == "JPEG"
        response = client.get(f"/image/{ids['touched.jpg']}")     # the content hash still says it is the same photo
        assert response.status_code == 200 and response.content == (photos / "touched.jpg").read_bytes()


# ---------------------------------------------------------------------------- hostile requests

BAD_REQUESTS = [
    ("/api/search", 400, "q is missing"),
    ("/api/search?q=", 400, "empty"),
    ("/api/search?q=%20%20", 400, "empty"),
    ('/api/search?q=%22beach', 400, "never closed"),
    ("/api/search?q=" + "x" * 50_000, 400, "characters long"),
    ("/api/search?q=a%00b", 400, "NUL"),
    ("/api/search?q=" + quote(" + ".join(["a"] * 40)), 400, "at most 16"),
    ("/api/search?q=a%20-%20a", 400, "cancel"),
    ("/api/search?q=id:" + "f" * 32, 400, "no photo with id"),
    ("/api/search?q=cat&top=-1", 400, "whole number"),
    ("/api/search?q=cat&top=abc", 400, "whole number"),
    ("/api/search?q=cat&top=1000000000000", 400, "whole number"),
    ("/api/search?q=cat&top=201", 400, "1 to 200"),
    ("/api/search?q=cat&top=0", 400, "1 to 200"),
    ("/api/search?q=cat&offset=9990&top=50", 400, "past result"),
    ("/api/search?q=cat&min_score=nan", 400, "between -1 and 1"),
    ("/api/search?q=cat&min_score=1e309", 400, "between -1 and 1"),
    ("/api/search?q=cat&min_score=2", 400, "between -1 and 1"),
    ("/api/search?q=cat&min_score=abc", 400, "not a number"),
    ("/api/search?q=cat&in=photos", 400, "absolute path"),
    ("/api/search?q=cat&in=/etc", 400, "not an indexed folder"),
    ("/api/search?q=cat&in=/%00", 400, "absolute path"),
    ("/api/search?q=cat&in=" + "/a" * 5000, 400, "absolute path"),
    ("/api/similar/not-an-id", 404, "32 hex"),
    ("/api/similar/" + "f" * 32, 404, "no photo"),
    ("/api/similar/" + "F" * 32, 404, "32 hex"),
    ("/thumb/../../etc/passwd", 404, ""),
    ("/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404, ""),
    ("/thumb/" + "0" * 32, 404, "no photo"),
    ("/image/..%2F..%2Fetc%2Fpasswd", 404, ""),
    ("/image/" + "0" * 31 + "g", 404, "32 hex"),
    ("/static/../../pyproject.toml", 404, ""),
    ("/static/", 404, ""),
    ("/static/app.js%00", 404, ""),
    ("/static/index.html", 404, ""),
    ("/etc/passwd", 404, "no such page"),
    ("/api", 404, "no such page"),
]


@pytest.mark.parametrize("url, status, says", BAD_REQUESTS, ids=[u[:60] for u, _, _ in BAD_REQUESTS])
def test_hostile_requests_get_a_one_line_4xx(client, url, status, says):
    response = client.get(url)
    message = one_line_error(response, status)
    assert says in message, message
    assert "root:" not in response.text


def test_malformed_encodings_and_repeated_parameters_do_not_break_it(client):
    assert client.get("/api/search?q=%FF%FE%FD").status_code == 200            # not UTF-8: read as U+FFFD text
    assert client.get("/api/search?q=cat&q=dog&top=2&top=3").status_code == 200
    assert client.get("/api/search?q=%E2%80%AE%D8%B9%D8%B1%D8%A8%D9%8A").status_code == 200   # RTL override + Arabic


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_only_get_is_answered(client, method):
    assert "only answers GET" in one_line_error(client.request(method, "/api/search?q=cat"), 405)


def test_other_hosts_are_refused_and_no_cors(client):
    assert "loopback" in one_line_error(client.get("/api/status", headers={"host": "evil.example"}), 403)
    assert client.get("/api/status", headers={"host": "localhost:8765"}).status_code == 200
    response = client.get("/api/status", headers={"origin": "http://evil.example"})
    assert response.status_code == 200
    assert not [h for h in response.headers if h.lower().startswith("access-control")]
    assert response.headers["cross-origin-resource-policy"] == "same-origin"
    assert response.headers["x-content-type-options"] == "nosniff"
    options = client.options("/api/status", headers={"origin": "http://evil.example",
                                                      "access-control-request-method": "GET"})
    assert options.status_code == 405 and "access-control-allow-origin" not in options.headers


def test_the_page_is_served_with_its_files_and_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text          # nothing from the network
    for name in ("app.js", "dupes.js", "style.css"):
        assert f"/static/{name}" in page.text
        assert client.get(f"/static/{name}").status_code == 200


def test_a_token_is_needed_when_the_server_has_one(world):
    token = "t" * 24
    with environment(world.env), served(world.index, world.bundle, world.home / "cache", token=token,
                                        hosts=None) as (client, _, _):
        assert "token" in one_line_error(client.get("/api/status"), 401)
        assert "token" in one_line_error(client.get("/api/status", headers={"authorization": "Bearer wrong"}), 401)
        assert client.get("/api/status", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert client.get(f"/api/status?token={token}").status_code == 200
        opened = client.get(f"/?token={token}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "httponly" in opened.headers["set-cookie"].lower() and "samesite=strict" in opened.headers["set-cookie"].lower()
        client.cookies.set("uclip_token", token)
        assert client.get("/api/status", headers={"host": "192.168.1.7:8765"}).status_code == 200


def test_listening_beyond_loopback_needs_a_flag_and_a_token(world):
    from uclip_cli.serve import ServeSetupError, check_address

    assert check_address("127.0.0.1", False, None) is None and check_address("::1", False, None) is None
    with pytest.raises(ServeSetupError, match="--allow-remote"):
        check_address("0.0.0.0", False, None)
    assert len(check_address("0.0.0.0", True, None)) >= 16                # a random token is made up
    with pytest.raises(ServeSetupError, match="16 characters"):
        check_address("0.0.0.0", True, "short")
    message = run_uclip(["serve", "--host", "0.0.0.0"], world.env).one_line_error()
    assert "--allow-remote" in message


def test_the_serve_extra_missing_is_one_line(world, monkeypatch):
    import sys

    from uclip_cli.serve import ServeSetupError, require_serve_extra

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    from uclip_cli.extras import install_command

    with pytest.raises(ServeSetupError) as refused:
        require_serve_extra()
    assert install_command("serve") in str(refused.value)
    code = ("import sys; sys.modules['starlette'] = None; sys.argv = ['uclip', 'serve']\n"
            "from uclip_cli.cli import main; main()")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], env=world.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"uclip: error: uclip serve needs the serve extra: {install_command('serve')}"]


def test_serving_imports_no_torch(world, tmp_path):
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from serve_helpers import served
from pathlib import Path
with served(Path({str(world.index)!r}), Path({str(world.bundle)!r}), Path({str(tmp_path)!r})) as (client, _, _):
    assert client.get("/api/search", params={{"q": "pes"}}).status_code == 200
    assert client.get("/api/status").status_code == 200
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
"""
    done = subprocess.run([sys.executable, "-c", script], env=world.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_connections_accepted_on_the_served_socket_send_without_waiting_for_acks():
    """Keep-alive requests (a browser's) must not wait for delayed ACKs: a response written as headers then body
    on a socket without TCP_NODELAY waited ~40 ms per request. asyncio (under uvicorn) sets TCP_NODELAY only on
    sockets whose protocol says TCP, so the served socket must be made that way."""
    import asyncio
    import socket

    from uclip_cli.serve import bind

    listening = bind("127.0.0.1", 0)
    accepted: list[int] = []

    async def main() -> None:
        def connected(reader, writer) -> None:
            accepted.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            while not accepted:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert listening.proto == socket.IPPROTO_TCP and accepted and accepted[0] != 0


# ---------------------------------------------------------------------------- connections (issue 19 item 2)

HALF_OPEN = b"GET / HTTP/1.1\r\nHost: "      # a request head that never ends
ANSWER_BOUND_S = 2.0                          # the owner's answer under the flood (measured: ms; 2 CPUs shared)
TOKEN = "t" * 24


def half_open(port: int, n: int, source: str = "127.0.0.1") -> list:
    import socket

    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.sendall(HALF_OPEN)
        held.append(s)
    return held


def closed_by_server(held: list, within: float) -> dict:
    """socket -> what the server wrote before closing it, for those it closed within `within` seconds."""
    import selectors

    closed: dict = {}
    received = {s: b"" for s in held}
    with selectors.DefaultSelector() as sel:      # epoll: fds past 1024 are fine
        for s in held:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while len(closed) < len(held) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:   # closed with the head still unread on the server's side
                    data = b""
                received[key.fileobj] += data
                if not data:
                    closed[key.fileobj] = received[key.fileobj]
                    sel.unregister(key.fileobj)
    return closed


def timed_get(port: int, path: str, *, source: str = "127.0.0.1", token: str | None = None, conn=None):
    """(status, seconds, connection) of one GET; a new connection unless `conn` (keep-alive) is given."""
    import http.client

    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    started = time.monotonic()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    response.read()
    return response.status, time.monotonic() - started, conn


def test_300_half_open_connections_do_not_lock_the_owner_out(world, tmp_path):
    """300 sockets that send half a request head and stop made every request a 503 (uvicorn's limit_concurrency
    counted them) for as long as they stayed open. Now the owner is answered within ANSWER_BOUND_S throughout,
    each half-open socket is closed (503 when a newer connection needed its place, 408 at the head deadline),
    and none outlives the deadline."""
    from uclip_cli.serve.connections import Gate

    gate = Gate(header_seconds=3.0)
    with environment(world.env), listening(world.index, world.bundle, tmp_path, gate=gate) as port:
        held = half_open(port, 300)
        try:
            started = time.monotonic()
            latencies = []
            keep_alive = None
            while time.monotonic() - started < 2.0:           # while all 300 are still held by their client
                status, seconds, _ = timed_get(port, "/api/status")
                assert status == 200
                status, seconds_kept, keep_alive = timed_get(port, "/api/search?q=cat", conn=keep_alive)
                assert status == 200
                latencies += [seconds, seconds_kept]
            assert len(latencies) >= 10 and max(latencies) < ANSWER_BOUND_S, latencies
            closed = closed_by_server(held, within=gate.header_seconds + 5)
            assert len(closed) == len(held)                   # none outlives the head deadline
            said = {data.split(b" ")[1] for data in closed.values() if data}
            assert b"408" in said and said <= {b"408", b"503"}, said   # timed out, or evicted for newer ones
            # (an evicted socket whose head the server had not read yet is reset: no answer to read)
            assert gate.timed_out > 0 and gate.evicted >= 300 - gate.per_peer
        finally:
            for s in held:
                s.close()


def test_a_peer_over_its_cap_is_limited_and_the_owner_still_answered(world, tmp_path):
    """With --allow-remote any peer reaches the socket before the token check: connections from one address are
    capped; past the cap that address's oldest waiting connection is closed, the token holder's last, so a
    flood from one peer neither locks out other addresses nor the owner's open connection on the same one."""
    from uclip_cli.serve.connections import Gate

    gate = Gate(per_peer=8, header_seconds=60.0)
    with environment(world.env), listening(world.index, world.bundle, tmp_path, token=TOKEN, gate=gate) as port:
        status, _, owner_there = timed_get(port, "/api/status", source="127.0.0.2", token=TOKEN)
        assert status == 200                                   # the owner's keep-alive connection, from that peer
        flood = half_open(port, 100, source="127.0.0.2")
        try:
            closed = closed_by_server(flood, within=5.0)
            assert len(closed) == 100 - (gate.per_peer - 1)     # the cap holds, minus the owner's connection
            assert all(data.startswith(b"HTTP/1.1 503") for data in closed.values() if data)
            assert all(s not in closed for s in flood[-(gate.per_peer - 1):])   # the newest are the ones kept
            status, seconds, _ = timed_get(port, "/api/status", source="127.0.0.2", token=TOKEN, conn=owner_there)
            assert status == 200 and seconds < ANSWER_BOUND_S
            status, seconds, _ = timed_get(port, "/api/status", source="127.0.0.1", token=TOKEN)
            assert status == 200 and seconds < ANSWER_BOUND_S   # another address is not limited at all
            assert timed_get(port, "/api/status", source="127.0.0.2")[0] == 401   # and the token is still needed
        finally:
            for s in flood:
                s.close()


def test_a_client_that_never_reads_its_photo_is_let_go_and_peers_count_by_address(tmp_path, tiny_bundle):
    """A busy connection is never evicted, so a client that asks for photos and never reads the answers would hold
    its connections (and a task each) for good: a response left unread for `stall_seconds` is abandoned."""
    import socket

    from uclip_cli.serve.connections import Gate, peer_key

    assert peer_key("2001:db8::1") == peer_key("2001:db8::2:3") == "2001:db8::/64"   # one host can hold a /64
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1" and peer_key("::1") == "::1" and peer_key("10.0.0.1") == "10.0.0.1"
    photos = tmp_path / "photos"
    photos.mkdir()
    big = photo_like(1600, 1600, seed=3)
    big.save(photos / "big.bmp")                                  # 7.7 MB, sent as it is: more than socket buffers
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    content_id = index_records(tmp_path / "index")[str(photos.resolve() / "big.bmp")].content_hash
    size = (photos / "big.bmp").stat().st_size
    gate = Gate(stall_seconds=1.0)
    with environment(env), listening(tmp_path / "index", tiny_bundle, tmp_path / "cache", gate=gate) as port:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(f"GET /image/{content_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        deadline = time.monotonic() + 15
        while gate.stalled == 0 and time.monotonic() < deadline:
            assert timed_get(port, "/api/status")[0] == 200      # others are answered meanwhile
            time.sleep(0.2)
        assert gate.stalled == 1
        received = b""
        reader.settimeout(10)
        try:
            while chunk := reader.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass
        reader.close()
        assert received.startswith(b"HTTP/1.1 200") and len(received) < size      # cut off, not completed


# ------------------------------------------------------------------------------------------ search by an uploaded photo

def upload(client, data: bytes, kind: str = "image/jpeg", **params):
    return client.post("/api/similar-upload", content=data, headers={"content-type": kind}, params=params)


def png_bytes(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def upload_vector(library, data: bytes) -> np.ndarray:
    """The query vector the server should make of these bytes: the indexer's decode, the served image encoder."""
    from uclip_cli.images import decode_image, preprocess

    with library.use() as state:
        image = decode_image(data, name="x", target_size=state.bundle.image.size)
        return state.heads.encoders.encode_image_query(preprocess(image, state.bundle.image)[None])[0]


def files_under(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_an_uploaded_copy_of_an_indexed_photo_finds_it_first(world, client):
    records = index_records(world.index)
    path = str(world.photos / "beach.jpg")
    out = ok(upload(client, (world.photos / "beach.jpg").read_bytes(), top=100))
    assert out["query"] == {"upload": records[path].content_hash, "kind": "image", "indexed": True}
    assert out["results"][0]["path"] == path and out["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {r["path"] for r in out["results"]} == {str(world.photos / p) for p in world.good}
    # the same pixels in other bytes (a PNG of it): decoded and encoded here, and still that photo first
    with Image.open(path) as im:
        again = ok(upload(client, png_bytes(im.convert("RGB")), "image/png", top=3))
    assert again["query"]["indexed"] is False
    assert again["results"][0]["path"] == path and again["results"][0]["score"] > 0.9, again["results"]


def test_an_unrelated_upload_is_scored_like_any_image_query(world, app):
    client, library, _ = app
    data = jpeg_bytes(photo_like(640, 480, seed=1234))
    out = ok(upload(client, data, "application/octet-stream", top=100))
    assert out["query"]["indexed"] is False and out["query"]["kind"] == "image"
    vectors = index_vectors(world.index)
    query = upload_vector(library, data)
    reference = reference_scores(world, query)
    got = {r["path"]: r["score"] for r in out["results"]}
    assert set(got) == {str(world.photos / p) for p in world.good}
    for p, score in got.items():
        assert_within(score, reference[p], dot_bound(vectors[p], query) + score_bound(0), p)
    # paging and filters apply as for /api/similar
    first, second = ok(upload(client, data, top=2)), ok(upload(client, data, top=2, offset=2))
    ranked = [r["path"] for r in out["results"]]
    assert [r["path"] for r in first["results"] + second["results"]] == ranked[:4] and first["more"]
    inside = ok(upload(client, data, top=100, **{"in": str(world.photos / "nested")}))
    assert all(r["path"].startswith(str(world.photos / "nested") + "/") for r in inside["results"])
    assert "top" in one_line_error(upload(client, data, top=0), 400)


@pytest.mark.parametrize("body, says", [
    (b"", "empty"),
    (b"just some text, not a photo\n" * 20, "cannot be used"),
    (jpeg_bytes(photo_like(200, 150, seed=5))[:900], "cannot be used"),    # truncated
])
def test_an_upload_that_is_no_usable_image_is_a_one_line_400(client, body, says):
    assert says in one_line_error(upload(client, body), 400)


def test_an_upload_over_the_pixel_cap_is_refused_before_decoding(client):
    from image_fixtures import huge_png_header

    assert "too large" in one_line_error(upload(client, huge_png_header(), "image/png"), 400)


def test_an_upload_needs_an_image_content_type(client):
    data = jpeg_bytes(photo_like(64, 64, seed=3))
    for kind in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""):
        assert "Content-Type" in one_line_error(upload(client, data, kind), 415)
    assert "only answers GET" in one_line_error(client.get("/api/similar-upload"), 405)


def asgi_post(app, headers: list, chunks) -> tuple[int, dict, int]:
    """POST /api/similar-upload straight into the ASGI app, the body as `chunks` arrive: (status, JSON, bytes read)."""
    import asyncio

    from serve_helpers import BASE_URL

    read = 0
    sent = []

    async def receive():
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    host = BASE_URL.split("//")[1].rstrip("/")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/similar-upload", "raw_path": b"/api/similar-upload", "query_string": b"", "root_path": "",
             "headers": [(b"host", host.encode()), (b"content-type", b"image/jpeg"), *headers],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", int(host.split(":")[1]))}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), read


def test_an_oversized_upload_is_413_without_reading_it_all(client, monkeypatch):
    import itertools

    from uclip_cli.serve import api

    limit = 1 << 20
    monkeypatch.setattr(api, "MAX_UPLOAD_BYTES", limit)
    chunk = b"\xff" * 65536
    # a declared length over the limit: refused before one byte is read
    status, body, read = asgi_post(client.app, [(b"content-length", str(50 * limit).encode())], itertools.repeat(chunk))
    assert status == 413 and "MiB" in body["error"] and read == 0
    # no length (chunked), endless: reading stops at the limit
    status, body, read = asgi_post(client.app, [], itertools.repeat(chunk))
    assert status == 413 and limit < read <= limit + len(chunk)
    # a lying length: the bytes are counted, not the header
    status, body, read = asgi_post(client.app, [(b"content-length", b"10")], itertools.repeat(chunk))
    assert status == 413 and read <= limit + len(chunk)
    # under the limit, whole: answered
    data = jpeg_bytes(photo_like(300, 200, seed=9))
    status, body, _ = asgi_post(client.app, [(b"content-length", str(len(data)).encode())],
                                iter([data[:1000], data[1000:]]))
    assert status == 200 and body["results"], body


def test_an_upload_is_never_written_to_disk(world, client, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(name, str(temp))
    before = files_under(world.home)
    data = jpeg_bytes(photo_like(1200, 900, seed=77))
    ok(upload(client, data, top=5))
    one_line_error(upload(client, data[:2000]), 400)
    assert files_under(world.home) == before
    assert not list(temp.iterdir())


def test_an_upload_needs_the_token_when_the_server_has_one(world):
    token = "u" * 24
    data = jpeg_bytes(photo_like(64, 64, seed=3))
    with environment(world.env), served(world.index, world.bundle, world.home / "cache", token=token,
                                        hosts=None) as (client, _, _):
        assert "token" in one_line_error(upload(client, data), 401)
        assert "token" in one_line_error(client.post("/api/similar-upload", content=data, headers={
            "content-type": "image/jpeg", "authorization": "Bearer wrong"}), 401)
        assert ok(client.post("/api/similar-upload", content=data, headers={
            "content-type": "image/jpeg", "authorization": f"Bearer {token}"}))["results"]
    with environment(world.env), served(world.index, world.bundle, world.home / "cache") as (client, _, _):
        assert "loopback" in one_line_error(client.post("/api/similar-upload", content=data, headers={
            "content-type": "image/jpeg", "host": "evil.example"}), 403)


def test_a_real_server_answers_413_before_the_body_is_sent(world, tmp_path):
    import socket

    with environment(world.env), listening(world.index, world.bundle, tmp_path / "cache") as port:
        head = (f"POST /api/similar-upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {1 << 40}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + b"\xff\xd8" * 1000)            # a terabyte announced, 2 kB sent
            answer = ""
            while not answer.endswith("}") and (chunk := sock.recv(65536)):
                answer += chunk.decode("latin-1")
        assert answer.startswith("HTTP/1.1 413") and "MiB" in answer, answer[:300]
        data = jpeg_bytes(photo_like(200, 150, seed=11))         # and the server still answers
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall((f"POST /api/similar-upload?top=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                          f"image/jpeg\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"results"' in answer, answer[:300]

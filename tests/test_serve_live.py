"""A running `uclip serve` while other processes index, remove, train and re-project: each change is in the
next answer, without a restart, and a query never mixes vectors of two heads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cli_helpers import index_records, index_vectors, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from rounding import U32, assert_within
from serve_helpers import bundle_with_heads, environment, needs, served, write_random_heads

needs("starlette", "the serve extra: pip install '.[serve]'")

QUERY = "kočka na okně"


@pytest.fixture
def world(tmp_path, tiny_bundle):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        (photos / f"photo_{i}.jpg").write_bytes(jpeg_bytes(photo_like(120, 90, seed=200 + i)))
    bundle = bundle_with_heads(tiny_bundle, tmp_path / "bundle")
    env = uclip_env(tmp_path, bundle=bundle, index=tmp_path / "index")
    run_uclip(["index", photos, "--no-progress"], env).ok()
    return tmp_path, photos, bundle, env


def paths(client, q=QUERY) -> set[str]:
    response = client.get("/api/search", params={"q": q, "top": 100})
    assert response.status_code == 200, response.text
    return {r["path"] for r in response.json()["results"]}


def test_commits_of_another_uclip_index_show_at_the_next_request(world):
    home, photos, bundle, env = world
    with environment(env), served(home / "index", bundle, home / "cache") as (client, library, _):
        assert paths(client) == {str(p) for p in photos.iterdir()}
        new = photos / "new.jpg"
        new.write_bytes(jpeg_bytes(photo_like(120, 90, seed=300)))
        run_uclip(["index", photos, "--no-progress"], env).ok()             # another process commits
        assert str(new) in paths(client)
        assert client.get("/api/status").json()["index"]["photos"] == 5
        new_id = index_records(home / "index")[str(new)].content_hash
        assert client.get(f"/thumb/{new_id}").status_code == 200

        new.unlink()
        run_uclip(["index", photos, "--no-progress"], env).ok()
        assert str(new) not in paths(client)
        for url in (f"/thumb/{new_id}", f"/image/{new_id}", f"/api/similar/{new_id}"):
            assert client.get(url).status_code == 404, url      # a removed photo is not served, cached or not


def test_new_heads_are_used_once_the_index_is_reprojected_never_before(world):
    home, photos, bundle, env = world
    with environment(env), served(home / "index", bundle, home / "cache") as (client, library, _):
        before = client.get("/api/search", params={"q": QUERY, "top": 100}).json()["results"]

        write_random_heads(bundle, seed=7)                 # what `uclip train` does to the bundle
        waiting = client.get("/api/search", params={"q": QUERY, "top": 100}).json()
        assert [(r["id"], r["score"]) for r in waiting["results"]] == [(r["id"], r["score"]) for r in before]
        assert any("uclip index" in note for note in waiting["notes"])
        assert any("uclip index" in note for note in client.get("/api/status").json()["notes"])

        assert "re-projected" in run_uclip(["index", "--no-progress"], env).ok().stdout
        after = client.get("/api/search", params={"q": QUERY, "top": 100}).json()
        assert after["notes"] == []
        with library.use() as state:
            query = state.heads.text_vectors([QUERY])[0]
            assert state.bundle.heads_fingerprint == index_heads(home / "index")
        vectors = index_vectors(home / "index")
        for r in after["results"]:
            reference = float(vectors[r["path"]].astype(np.float64) @ query.astype(np.float64))
            assert_within(r["score"], reference, U32 + 5e-7, r["path"])
        assert [r["score"] for r in after["results"]] != [r["score"] for r in before]


def index_heads(index) -> str:
    from uclip_cli.index.access import open_index

    with open_index(index) as store:
        return store.heads_fingerprint


def test_a_snapshot_in_use_is_not_closed_under_a_request_and_idle_servers_let_go(world):
    home, photos, bundle, env = world
    with environment(env), served(home / "index", bundle, home / "cache") as (client, library, _):
        with library.use() as held:
            (photos / "more.jpg").write_bytes(jpeg_bytes(photo_like(120, 90, seed=301)))
            run_uclip(["index", photos, "--no-progress"], env).ok()
            assert str(photos / "more.jpg") in paths(client)      # the next request has the new snapshot
            assert held.retired and len(held.store.catalogue.paths_for_rows(range(held.store.rows))) == 4   # the old one still reads
        assert held.store.catalogue._conn is None                            # ...and is closed once its request is done

        reloads = library.reloads
        (photos / "more.jpg").unlink()
        run_uclip(["index", photos, "--no-progress"], env).ok()
        library.refresh_idle()                                     # what the server does every few seconds
        assert library.reloads == reloads + 1


def test_concurrent_requests_while_the_index_changes(world):
    home, photos, bundle, env = world
    errors: list[str] = []
    with environment(env), served(home / "index", bundle, home / "cache", workers=2) as (client, library, _):
        ids = [r["id"] for r in client.get("/api/search", params={"q": QUERY, "top": 100}).json()["results"]]
        stop = threading.Event()

        def hammer(i: int) -> None:
            while not stop.is_set():
                for url in (f"/api/search?q=query%20{i}", f"/api/similar/{ids[i % len(ids)]}", f"/thumb/{ids[i % len(ids)]}"):
                    response = client.get(url)
                    if response.status_code != 200:
                        errors.append(f"{url}: {response.status_code} {response.text}")

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for i in range(2):
            (photos / f"extra_{i}.jpg").write_bytes(jpeg_bytes(photo_like(120, 90, seed=400 + i)))
            run_uclip(["index", photos, "--no-progress"], env).ok()
        stop.set()
        for t in threads:
            t.join()
        assert errors == []
        assert {str(photos / "extra_0.jpg"), str(photos / "extra_1.jpg")} <= paths(client)

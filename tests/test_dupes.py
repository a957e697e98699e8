"""`uclip dupes` and the library under it (uclip_cli/dupes.py) over real fixture JPEGs, indexed with the tiny
test bundle.

The tiny bundle's image tower has random (seeded) weights, so 0.95 (the default, chosen for CLIP ViT-B/32)
means nothing for it. The tests measure what its frozen features give: the cosine of each near copy (a
resize, a re-save at another JPEG quality, a crop by 2 pixels) to its original, and of unrelated photos to
each other (>= 0.9998 vs <= 0.983), assert a margin between the two, and use the threshold halfway between.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import index_vectors, invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli.dupes import components
from uclip_cli.near_pairs import exact_pairs, probed_pairs

MARGIN = 0.005     # cosine, each side of the threshold


@dataclass(frozen=True)
class Library:
    photos: Path
    env: dict
    threshold: float
    near: list[str]          # the original and its near copies
    unrelated: list[str]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_bundle) -> Library:
    home = tmp_path_factory.mktemp("dupes_home")
    photos = (home / "photos").resolve()
    (photos / "edits").mkdir(parents=True)
    (photos / "other").mkdir()
    original = photo_like(320, 240, seed=7)
    files = {
        "beach.jpg": jpeg_bytes(original, quality=92),
        "edits/beach_small.jpg": jpeg_bytes(original.resize((160, 120)), quality=92),
        "edits/beach_q60.jpg": jpeg_bytes(original, quality=60),
        "edits/beach_crop.jpg": jpeg_bytes(original.crop((2, 2, 318, 238)), quality=92),
        "other/beach_exact.jpg": jpeg_bytes(original, quality=92),      # the same bytes: one row, two paths
    }
    unrelated = {f"other/photo_{seed}.jpg": jpeg_bytes(photo_like(320, 240, seed=seed), quality=90)
                 for seed in (11, 23, 41, 59)}
    for name, data in {**files, **unrelated}.items():
        (photos / name).write_bytes(data)
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    features = index_vectors(home / "index", "features")
    near = [str(photos / n) for n in files]
    far = [str(photos / n) for n in unrelated]
    first = features[near[0]]
    lowest_near = min(float(first @ features[p]) for p in near[1:])
    highest_far = max(float(features[a] @ features[b]) for a in near + far for b in far if a != b)
    # measured with the seeded tiny bundle: near copies >= 0.9998, unrelated photos <= 0.983 (random weights
    # give every photo a large common direction); the copies' cosine distance is ~100x smaller
    assert lowest_near - highest_far > 2 * MARGIN, (lowest_near, highest_far)
    assert 1 - highest_far > 10 * (1 - lowest_near), (lowest_near, highest_far)
    return Library(photos, env, round((lowest_near + highest_far) / 2, 4), near, far)


def dupes_json(library: Library, *args) -> dict:
    out = invoke_uclip(["dupes", "--threshold", library.threshold, "--format", "json", *map(str, args)], library.env)
    return json.loads(out.ok().stdout)


def test_near_copies_group_together_and_unrelated_photos_do_not(library):
    out = dupes_json(library)
    assert out["photos"] == 8 and len(out["groups"]) == 1
    group = out["groups"][0]
    paths = sorted(p for m in group["members"] for p in m["paths"])
    assert paths == sorted(library.near)
    assert group["files"] == 5 and group["photos"] == 4
    exact = [m for m in group["members"] if m["exact_copies"] == 2]
    assert len(exact) == 1 and sorted(exact[0]["paths"]) == sorted(library.near[i] for i in (0, 4))
    first = group["members"][0]
    assert (first["width"], first["height"]) == (320, 240) and first["similarity"] == 1.0   # the largest first
    for m in group["members"]:
        assert m["size"] > 0 and m["taken"] and m["width"] and m["id"]
        assert m["similarity"] >= library.threshold


def test_formats_table_and_paths(library):
    table = invoke_uclip(["dupes", "-t", library.threshold], library.env).ok().stdout
    assert "group 1: 5 files, 4 distinct" in table and "(exact copy)" in table and "nothing was deleted" in table
    assert "320x240" in table and not any(p in table for p in library.unrelated)
    paths = invoke_uclip(["dupes", "-t", library.threshold, "--format", "paths"], library.env).ok().stdout
    assert sorted(paths.split()) == sorted(library.near)


def test_in_restricts_to_a_folder(library):
    out = dupes_json(library, "--in", library.photos / "edits")
    assert out["photos"] == 3
    assert sorted(p for m in out["groups"][0]["members"] for p in m["paths"]) == sorted(library.near[1:4])
    other = dupes_json(library, "--in", library.photos / "other")   # its copy of beach.jpg has no partner there
    assert other["photos"] == 5 and other["groups"] == []
    elsewhere = library.photos.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    assert "--in" in invoke_uclip(["dupes", "--in", elsewhere], library.env).one_line_error()


def test_a_strict_threshold_finds_fewer_and_nothing_is_deleted(library):
    before = sorted(p for p in library.photos.rglob("*") if p.is_file())
    strict = dupes_json(library, "--threshold", 1.0)
    assert all(g["photos"] <= 2 for g in strict["groups"])
    invoke_uclip(["dupes"], library.env).ok()
    assert sorted(p for p in library.photos.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("value", ["0.2", "1.5", "nan"])
def test_a_bad_threshold_is_one_line_naming_the_option(library, value):
    assert "--threshold" in invoke_uclip(["dupes", "--threshold", value], library.env).one_line_error()


def test_a_bad_format_names_the_option(library):
    result = invoke_uclip(["dupes", "--format", "xml"], library.env)
    assert result.code == 2 and "--format" in result.stderr


def test_an_empty_or_small_index_says_so(tmp_path, tiny_bundle):
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    assert "uclip index" in invoke_uclip(["dupes"], env).one_line_error()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.jpg").write_bytes(jpeg_bytes(photo_like(64, 48, seed=3)))
    invoke_uclip(["index", tmp_path / "one", "--no-progress"], env).ok()
    result = invoke_uclip(["dupes"], env).ok()
    assert result.stdout == "" and result.stderr.strip() == "only 1 photo in the index: nothing to compare"


def clustered(rows: int, dim: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Unit rows with clusters of near copies (cosine >= ~0.95 to their first) hidden at random rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clusters = np.split(rng.permutation(rows)[:rows // 10 * 3], rows // 10)
    for members in clusters:
        x[members[1:]] = x[members[0]] + 0.02 * rng.standard_normal((len(members) - 1, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [sorted(c.tolist()) for c in clusters]


def float64_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """The reference: every pair whose float64 cosine of the float32 rows is >= threshold."""
    full = x.astype(np.float64) @ x.astype(np.float64).T
    return {(a, b) for a, b in zip(*np.nonzero(full >= threshold)) if a < b}


def test_exact_pairs_are_every_pair_at_the_threshold_in_any_blocking():
    x, clusters = clustered(300, 16, seed=0)
    want = float64_pairs(x, 0.9)
    for block_rows, block_cols in ((37, 53), (300, 300), (1, 7)):
        i, j = exact_pairs(x, 0.9, block_rows=block_rows, block_cols=block_cols)
        assert set(zip(i.tolist(), j.tolist())) == want
    groups = [g.tolist() for g in components(len(x), *exact_pairs(x, 0.9))]
    assert all(any(set(c) <= set(g) for g in groups) for c in clusters)


def test_a_pair_on_the_threshold_is_decided_in_float64_not_by_float32_rounding():
    x, clusters = clustered(40, 64, seed=1)
    first, second = clusters[0][:2]
    cosine = float(x[first].astype(np.float64) @ x[second].astype(np.float64))
    # thresholds 1e-12 either side of the pair's cosine: far inside float32's rounding of a product (~1e-7),
    # far outside float64's (~1e-16), so only a float64 check decides both the same way as the reference
    every_cell = lambda x, t: probed_pairs(x, t, cells=4, probes=4)    # noqa: E731  (probing all: no miss)
    for threshold in (cosine - 1e-12, cosine + 1e-12):
        want = float64_pairs(x, threshold)
        assert ((first, second) in want) == (threshold < cosine)
        for way in (exact_pairs, every_cell):
            assert set(zip(*(p.tolist() for p in way(x, threshold)))) == want, threshold


def test_probed_pairs_report_only_true_pairs_and_find_planted_clusters():
    x, clusters = clustered(3000, 32, seed=2)
    want = float64_pairs(x, 0.9)
    i, j = probed_pairs(x, 0.9, cells=40, probes=3)
    got = set(zip(i.tolist(), j.tolist()))
    assert got <= want                            # never a pair below the threshold
    assert len(got) >= 0.99 * len(want)           # recall (bench_dupes.py measures it at 100,000 rows)
    groups = {tuple(g.tolist()) for g in components(len(x), i, j)}
    assert sum(tuple(c) in groups for c in clusters) >= 0.98 * len(clusters)
    again = probed_pairs(x, 0.9, cells=40, probes=3)            # deterministic: the same pairs every run
    assert set(zip(*(p.tolist() for p in again))) == got
    everything = probed_pairs(x, 0.9, cells=5, probes=5)        # every cell probed: every pair
    assert set(zip(*(p.tolist() for p in everything))) == want


def test_small_indexes_compare_every_pair_and_large_ones_nearby_pairs():
    from uclip_cli.near_pairs import EXACT_ROWS, choose

    assert choose(EXACT_ROWS) == "exact" and choose(EXACT_ROWS + 1) == "probed"
    assert choose(10, exact=False) == "probed" and choose(10 * EXACT_ROWS, exact=True) == "exact"


def test_the_cli_default_is_the_library_default():
    import inspect

    from uclip_cli import cli
    from uclip_cli.dupes import DEFAULT_THRESHOLD

    assert inspect.signature(cli.dupes).parameters["threshold"].default.default == DEFAULT_THRESHOLD


def test_the_json_api_answers_the_same_groups(library, tiny_bundle, tmp_path):
    pytest.importorskip("starlette")
    from serve_helpers import environment, served

    cli = dupes_json(library)
    with environment(library.env), served(library.photos.parent / "index", tiny_bundle, tmp_path) as (client, _, _):
        answer = client.get("/api/dupes", params={"threshold": library.threshold})
        assert answer.status_code == 200, answer.text
        api = answer.json()
        assert [[m["paths"] for m in g["members"]] for g in api["groups"]] == \
            [[m["paths"] for m in g["members"]] for g in cli["groups"]]
        assert api["groups"][0]["members"][0]["thumb"].startswith("/thumb/") and api["more"] is False
        inside = client.get("/api/dupes", params={"threshold": library.threshold, "in": str(library.photos / "edits")})
        assert inside.json()["photos"] == 3
        for params, word in (({"threshold": "0.1"}, "threshold"), ({"threshold": "x"}, "threshold"),
                             ({"in": "/nowhere"}, "in="), ({"top": "0"}, "top")):
            bad = client.get("/api/dupes", params=params)
            assert bad.status_code == 400 and word in bad.json()["error"], bad.text


def test_searches_are_answered_while_a_dupes_computation_runs(library, tiny_bundle, tmp_path):
    """The pair search runs without the server's lock, in the dupes worker: with it held up (an injected pair
    search that waits for an event), a search, a similar-photos request and the status are answered; then the
    dupes answer arrives, and asking again is answered from the cache, without a second computation."""
    pytest.importorskip("starlette")
    import threading

    from starlette.testclient import TestClient

    from serve_helpers import BASE_URL, PORT, environment
    from uclip_cli.near_pairs import find_pairs
    from uclip_cli.serve.app import create_app, loopback_hosts
    from uclip_cli.serve.dupes_jobs import DupesJobs
    from uclip_cli.serve.live import Library
    from uclip_cli.serve.thumbnails import Thumbnails
    from uclip_cli.sessions import SessionFactory

    started, release = threading.Event(), threading.Event()

    def held_up(x, threshold, **options):
        started.set()
        assert release.wait(120), "the test never released the pair search"
        return find_pairs(x, threshold, **options)

    jobs = DupesJobs(find=held_up)
    params = {"threshold": library.threshold}
    with environment(library.env):
        library_served = Library(library.photos.parent / "index", tiny_bundle, SessionFactory(threads=1)).open()
        app = create_app(library_served, Thumbnails(tmp_path / "thumbnails", workers=1), hosts=loopback_hosts(PORT),
                         token=None, dupes_jobs=jobs)
        with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as client:
            answers: dict[str, object] = {}

            def ask(name: str, url: str, query: dict | None = None) -> threading.Thread:
                thread = threading.Thread(target=lambda: answers.__setitem__(name, client.get(url, params=query)),
                                          daemon=True)
                thread.start()
                return thread

            dupes = ask("dupes", "/api/dupes", params)
            try:
                assert started.wait(120), "the dupes computation never started"
                search = ask("search", "/api/search", {"q": "beach"})
                search.join(60)                     # not answered while dupes hold the lock: a failure, not a hang
                assert not search.is_alive(), "a search waited for the dupes computation"
                assert answers["search"].status_code == 200 and answers["search"].json()["results"]
                photo_id = answers["search"].json()["results"][0]["id"]
                assert client.get(f"/api/similar/{photo_id}").status_code == 200
                assert client.get("/api/status").status_code == 200
                assert dupes.is_alive()             # still held up: the answers above did not wait for it
            finally:
                release.set()
            dupes.join(120)
            first = answers["dupes"]
            assert first.status_code == 200, first.text
            assert sorted(p for m in first.json()["groups"][0]["members"] for p in m["paths"]) == sorted(library.near)
            again = client.get("/api/dupes", params=params)
            assert again.json()["groups"] == first.json()["groups"] and jobs.computed == 1
            other = client.get("/api/dupes", params={"threshold": 1.0})     # another question: computed anew
            assert other.status_code == 200 and jobs.computed == 2


def test_exact_and_approximate_agree_on_a_small_library(library):
    exact = dupes_json(library, "--exact")
    approximate = dupes_json(library, "--approximate")
    assert [[m["paths"] for m in g["members"]] for g in exact["groups"]] == \
        [[m["paths"] for m in g["members"]] for g in approximate["groups"]]
    assert len(exact["groups"]) == 1


def test_a_long_run_shows_progress_unless_told_not_to(tmp_path):
    """6,000 photos (past dupes.PROGRESS_ROWS) in an index written as `uclip index` writes one: each stage of
    the search reports on stderr; --no-progress leaves stderr empty; the planted copies are found either way."""
    from pathlib import Path

    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.records import Embedded, PhotoMeta
    from uclip_cli.walk import FileEntry

    x, clusters = clustered(6000, 32, seed=3)
    with open_index(tmp_path / "index", IndexIdentity("img", "heads", 32, 32, "test"), "create") as store:
        meta = PhotoMeta(taken="2024-06-01T12:00:00", taken_source="exif", width=40, height=30)
        entries = [Embedded(FileEntry(path=Path(f"/p/{k}.jpg"), root=Path("/p"), size=1, mtime_ns=1),
                            f"{k:032x}", meta) for k in range(len(x))]
        store.add_batch(entries, x, x)
    env = uclip_env(tmp_path, index=tmp_path / "index")
    for flags, stages in ((["--approximate"], ["placing cells", "finding each photo's cells", "comparing nearby photos"]),
                          (["--exact"], ["comparing every pair"])):
        shown = invoke_uclip(["dupes", "-t", "0.9", "--format", "paths", *flags], env).ok()
        assert all(stage in shown.stderr for stage in stages), shown.stderr
        quiet = invoke_uclip(["dupes", "-t", "0.9", "--format", "paths", "--no-progress", *flags], env).ok()
        assert quiet.stderr == "" and quiet.stdout == shown.stdout
        groups = [sorted(int(p[3:-4]) for p in g.split("\n")) for g in shown.stdout.strip().split("\n\n")]
        assert all(c in groups for c in clusters)

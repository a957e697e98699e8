"""Photo metadata (issue 23 item 1) and the filters it makes possible (item 2), end to end over JPEGs that carry
real EXIF as cameras write it (Pillow: DateTimeOriginal + OffsetTimeOriginal, Make/Model, LensModel,
Orientation, a GPS IFD of degree/minute/second ratios): what `uclip index` stores, that each filter of
`uclip query` and of the JSON API selects exactly the photos it should, before the top -n, that an index
made before metadata gets it on the next `uclip index` without embedding anything again, and that a bad
filter value is one line naming it."""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from cli_helpers import invoke_uclip, parse_summary, uclip_env
from image_fixtures import write_exif_photo

ZAGREB, SPLIT, SYDNEY = (45.8150, 15.9819), (43.5081, 16.4402), (-33.8688, 151.2093)   # Zagreb-Split: 260 km
ALL = ["-n", "100", "--format", "json"]
MTIME_2020 = time.mktime((2020, 3, 1, 12, 0, 0, 0, 0, -1))

PHOTOS = {   # name -> write_exif_photo arguments
    "beach.jpg": dict(taken="2019:07:14 10:00:00", offset="+02:00", make="Google", model="Pixel 7",
                      lens="Pixel 7 back camera 6.81mm f/1.85", gps=ZAGREB),
    "split.jpg": dict(taken="2019:08:20 18:30:05", make="Canon", model="Canon EOS R5", gps=SPLIT, size=(64, 96)),
    "winter.jpg": dict(taken="2019:12:24 20:00:00", make="Google", model="Pixel 7", orientation=6),
    "sydney.jpg": dict(taken="2018:05:01 08:00:00", make="Apple", model="iPhone 8", gps=SYDNEY),
    "june_first.jpg": dict(taken="2019:06:01 00:00:00", make="Apple", model="iPhone 8"),
    "bad_date.jpg": dict(taken="0000:00:00 00:00:00", make="NIKON CORPORATION", model="NIKON D750"),
}
PLAIN = [f"plain_{i}.jpg" for i in range(5)]    # no EXIF at all: capture time from the mtime


def make_library(folder: Path) -> Path:
    for seed, (name, exif) in enumerate(PHOTOS.items()):
        write_exif_photo(folder / name, seed, **exif)
    for seed, name in enumerate(PLAIN, start=100):
        write_exif_photo(folder / name, seed)
    for name in [*PHOTOS, *PLAIN]:
        if name not in ("beach.jpg", "split.jpg", "winter.jpg", "sydney.jpg", "june_first.jpg"):
            os.utime(folder / name, (MTIME_2020, MTIME_2020))
    return folder


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_bundle):
    home = tmp_path_factory.mktemp("filters_home")
    photos = make_library((home / "photos").resolve())
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    return photos, home / "index", env


def stored(index: Path) -> dict[str, dict]:
    with sqlite3.connect(index / "catalog.sqlite") as c:
        c.row_factory = sqlite3.Row
        return {Path(r["path"]).name: dict(r) for r in c.execute("SELECT * FROM files")}


def names(env, *args) -> list[str]:
    out = json.loads(invoke_uclip(["query", *map(str, args), *ALL], env).ok().stdout)
    return [Path(r["path"]).name for r in out["results"]]


# ------------------------------------------------------------------------------------------ stored


def test_index_stores_each_photos_metadata(library):
    _, index, _ = library
    records = stored(index)
    beach = records["beach.jpg"]
    assert (beach["taken"], beach["taken_source"], beach["taken_offset"]) == ("2019-07-14T10:00:00", "exif", "+02:00")
    assert (beach["make"], beach["model"], beach["lens"]) == ("Google", "Pixel 7", "Pixel 7 back camera 6.81mm f/1.85")
    assert (beach["width"], beach["height"]) == (96, 64)
    assert beach["lat"] == pytest.approx(ZAGREB[0], abs=1e-6) and beach["lon"] == pytest.approx(ZAGREB[1], abs=1e-6)
    sydney = records["sydney.jpg"]     # south and east: a negative latitude
    assert sydney["lat"] == pytest.approx(SYDNEY[0], abs=1e-6) and sydney["lon"] == pytest.approx(SYDNEY[1], abs=1e-6)
    winter = records["winter.jpg"]     # stored 96x64, turned by its orientation: shown 64x96
    assert (winter["orientation"], winter["width"], winter["height"]) == (6, 64, 96)
    assert winter["lat"] is None and winter["lon"] is None and winter["taken_offset"] is None
    expected_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(MTIME_2020))
    for name in ["bad_date.jpg", *PLAIN]:   # no date, or one that is no date: the file's mtime, said so
        assert (records[name]["taken"], records[name]["taken_source"]) == (expected_mtime, "mtime"), name
    assert records["bad_date.jpg"]["make"] == "NIKON CORPORATION"
    assert records["plain_0.jpg"]["make"] is None and records["plain_0.jpg"]["lat"] is None


# ------------------------------------------------------------------------------------------ filters (CLI)


@pytest.mark.parametrize("args, expected", [
    (["--after", "2019-06", "--before", "2019-09"], {"beach.jpg", "split.jpg", "june_first.jpg"}),
    (["--after", "2019-06-02", "--before", "2019-09"], {"beach.jpg", "split.jpg"}),
    (["--before", "2019"], {"sydney.jpg"}),
    (["--after", "2020"], {"bad_date.jpg", *PLAIN}),
    (["--camera", "pixel 7"], {"beach.jpg", "winter.jpg"}),
    (["--camera", "CANON eos"], {"split.jpg"}),
    (["--camera", "nikon d"], {"bad_date.jpg"}),
    (["--near", "45.81,15.98", "--within", "20km"], {"beach.jpg"}),
    (["--near", "45.81,15.98", "--within", "300km"], {"beach.jpg", "split.jpg"}),
    (["--near", "45.81, 15.98"], {"beach.jpg"}),                      # default 10 km
    (["--near", "-33.87,151.21", "--within", "2000m"], {"sydney.jpg"}),
    (["--has-gps"], {"beach.jpg", "split.jpg", "sydney.jpg"}),
    (["--portrait"], {"split.jpg", "winter.jpg"}),
    (["--landscape"], {"beach.jpg", "sydney.jpg", "june_first.jpg", "bad_date.jpg", *PLAIN}),
    (["--camera", "pixel", "--portrait"], {"winter.jpg"}),
    (["--has-gps", "--after", "2019", "--landscape"], {"beach.jpg"}),
])
def test_each_cli_filter_selects_exactly_its_photos(library, args, expected):
    _, _, env = library
    assert set(names(env, "a photo", *args)) == expected


@pytest.mark.parametrize("query, expected", [
    ("a photo after:2019-06 before:2019-09", {"beach.jpg", "split.jpg", "june_first.jpg"}),
    ("pláž after:2019-06 camera:pixel", {"beach.jpg", "winter.jpg"}),
    ('photo camera:"pixel 7" is:portrait', {"winter.jpg"}),
    ("photo near:45.81,15.98 within:300km", {"beach.jpg", "split.jpg"}),
    ("has:gps photo is:landscape", {"beach.jpg", "sydney.jpg"}),
])
def test_filters_written_in_the_query_text(library, query, expected):
    _, _, env = library
    assert set(names(env, query)) == expected


def test_query_text_and_options_combine(library):
    _, _, env = library
    assert set(names(env, "photo camera:pixel", "--before", "2019-09")) == {"beach.jpg"}


def test_a_quoted_filter_word_is_text(library):
    _, _, env = library
    out = json.loads(invoke_uclip(["query", 'photo "camera:pixel"', *ALL], env).ok().stdout)
    assert len(out["results"]) == len(PHOTOS) + len(PLAIN)


def test_n_counts_photos_that_pass(library):
    """Filters apply before the top -n: -n K gives the K best photos that pass, even where none of them is
    among the K best of all photos (a filter applied after the top-k would give fewer, or none)."""
    _, _, env = library
    everything = names(env, "a photo")
    assert len(everything) == len(PHOTOS) + len(PLAIN)
    beyond_top = 0
    for args, passing in ([["--camera", "pixel"], {"beach.jpg", "winter.jpg"}],
                          [["--camera", "iphone"], {"sydney.jpg", "june_first.jpg"}],
                          [["--after", "2020"], {"bad_date.jpg", *PLAIN}],
                          [["--has-gps"], {"beach.jpg", "split.jpg", "sydney.jpg"}]):
        best = [n for n in everything if n in passing][:2]
        got = json.loads(invoke_uclip(["query", "a photo", *args, "-n", "2", "--format", "json"], env).ok().stdout)
        assert [Path(r["path"]).name for r in got["results"]] == best, args
        beyond_top += not set(best) <= set(everything[:2])
    assert beyond_top >= 2    # the check above is not vacuous: most of these filters keep photos outside the top 2


def test_sort_date_lists_matches_by_capture_time(library):
    _, _, env = library
    out = json.loads(invoke_uclip(["query", "a photo", "--has-gps", "--sort", "date", *ALL], env).ok().stdout)
    assert [Path(r["path"]).name for r in out["results"]] == ["sydney.jpg", "beach.jpg", "split.jpg"]
    assert [r["taken"] for r in out["results"]] == ["2018-05-01T08:00:00", "2019-07-14T10:00:00", "2019-08-20T18:30:05"]
    newest = names(env, "a photo", "--has-gps", "--sort", "newest")
    assert newest == ["split.jpg", "beach.jpg", "sydney.jpg"]
    table = invoke_uclip(["query", "a photo", "--has-gps", "--sort", "date"], env).ok().stdout.splitlines()
    assert "2018-05-01T08:00:00" in table[1] and table[1].endswith("sydney.jpg")


def test_filters_alone_list_the_photos_that_pass_newest_first(library):
    _, _, env = library
    out = json.loads(invoke_uclip(["query", "camera:pixel", *ALL], env).ok().stdout)
    assert [Path(r["path"]).name for r in out["results"]] == ["winter.jpg", "beach.jpg"]
    assert out["kind"] == "filters" and all(r["score"] is None for r in out["results"])
    assert names(env, "--has-gps", "--sort", "date", "") == ["sydney.jpg", "beach.jpg", "split.jpg"]


def test_filters_nothing_passes_is_one_line(library):
    _, _, env = library
    message = invoke_uclip(["query", "a photo", "--camera", "leica", "--has-gps"], env).one_line_error()
    assert "no photo in the index" in message and "--camera leica --has-gps" in message


@pytest.mark.parametrize("args, named, advice", [
    (["--after", "2019-13"], "--after 2019-13", "2019-06"),
    (["--before", "yesterday"], "--before yesterday", "2019-06-14"),
    (["--after", "2019-02-30"], "--after 2019-02-30", "2019-06-14"),
    (["--near", "100,15"], "--near 100,15", "LAT,LON"),
    (["--near", "zagreb"], "--near zagreb", "LAT,LON"),
    (["--near", "45,15", "--within", "5 parsecs"], "--within 5 parsecs", "20km"),
    (["--within", "5km"], "--within 5km", "--near"),
    (["--portrait", "--landscape"], "--portrait and --landscape", "keep one"),
    (["--after", "2019-09", "--before", "2019-06"], "--after 2019-09 and --before 2019-06", "--after before the --before"),
    (["--sort", "size"], "--sort size", "score, date, newest"),
])
def test_bad_filter_values_are_one_line(library, args, named, advice):
    _, _, env = library
    message = invoke_uclip(["query", "a photo", *args], env).one_line_error()
    assert named in message and advice in message, message


def test_bad_filter_word_in_the_query_is_one_line(library):
    _, _, env = library
    message = invoke_uclip(["query", "party after:midnight"], env).one_line_error()
    assert "after:midnight" in message and "2019-06" in message


def test_filters_no_photo_under_in_passes_is_one_line(tmp_path, tiny_bundle):
    photos = (tmp_path / "photos").resolve()
    make_library(photos / "trips")
    write_exif_photo(photos / "scans" / "scan.jpg", 7)
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    out = invoke_uclip(["index", photos, "--no-progress"], env).ok().stdout
    assert "read the metadata" not in out        # a new index reads it with the decode, not afterwards
    message = invoke_uclip(["query", "a photo", "--in", photos / "scans", "--camera", "pixel"], env).one_line_error()
    assert f"no photo under --in {photos / 'scans'} passes --camera pixel (2 elsewhere" in message
    assert names(env, "a photo", "--in", photos / "trips", "--camera", "pixel") != []


# ------------------------------------------------------------------------------------------ older indexes


def test_an_index_made_before_metadata_gets_it_without_embedding_again(tmp_path, tiny_bundle):
    photos = make_library((tmp_path / "photos").resolve())
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    catalogue = tmp_path / "index" / "catalog.sqlite"
    with sqlite3.connect(catalogue) as c:     # the catalogue as uclip wrote it before metadata
        for column in ("taken", "taken_source", "taken_offset", "make", "model", "lens", "orientation", "width",
                       "height", "lat", "lon"):
            c.execute(f"ALTER TABLE files DROP COLUMN {column}")
    rows_before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.name.startswith(("vectors", "features"))}

    message = invoke_uclip(["query", "a photo", "--camera", "pixel"], env).one_line_error()
    assert "no photo metadata yet" in message and "uclip index" in message

    out = invoke_uclip(["index", "--no-progress"], env).ok().stdout
    assert parse_summary(out)["embedded"] == 0
    assert f"read the metadata (date, camera, place) of {len(PHOTOS) + len(PLAIN)} photos" in out
    assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir()
            if p.name.startswith(("vectors", "features"))} == rows_before
    assert stored(tmp_path / "index")["beach.jpg"]["model"] == "Pixel 7"
    assert set(names(env, "a photo", "--camera", "pixel")) == {"beach.jpg", "winter.jpg"}
    assert "nothing new to index" in invoke_uclip(["index", "--no-progress"], env).ok().stdout

    with sqlite3.connect(catalogue) as c:     # a photo without metadata among others (e.g. imported from shards)
        c.execute("UPDATE files SET taken_source = NULL WHERE path LIKE '%/plain_0.jpg'")
    done = invoke_uclip(["query", "a photo", "--after", "2020", *ALL], env).ok()
    assert "plain_0.jpg" not in done.stdout and "note: 1 photos have no date, camera or place" in done.stderr
    assert "of 1 photos" in invoke_uclip(["index", "--no-progress"], env).ok().stdout
    assert "plain_0.jpg" in invoke_uclip(["query", "a photo", "--after", "2020", *ALL], env).ok().stdout


def test_a_moved_photo_keeps_its_metadata(tmp_path, tiny_bundle):
    photos = make_library((tmp_path / "photos").resolve())
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    (photos / "beach.jpg").rename(photos / "moved_beach.jpg")
    out = invoke_uclip(["index", "--no-progress"], env).ok().stdout
    assert parse_summary(out)["embedded"] == 0
    assert stored(tmp_path / "index")["moved_beach.jpg"]["model"] == "Pixel 7"


# ------------------------------------------------------------------------------------------ the JSON API


@pytest.fixture(scope="module")
def served_env(library, tiny_bundle, tmp_path_factory) -> dict:
    """The library's environment with a bundle that has heads (as `uclip serve` wants), its index re-projected."""
    from serve_helpers import bundle_with_heads, needs

    needs("starlette", "the serve extra: pip install '.[serve]'")
    photos, _, env = library
    home = tmp_path_factory.mktemp("filters_api")
    bundle = bundle_with_heads(tiny_bundle, home / "bundle")
    served = {**env, "UCLIP_BUNDLE": str(bundle), "XDG_CACHE_HOME": str(home / "cache")}
    invoke_uclip(["index", photos, "--no-progress"], served).ok()   # the heads' vectors (no image decoded)
    return served


@pytest.fixture(scope="module")
def api(library, served_env):
    from serve_helpers import environment, served

    with environment(served_env), served(library[1], Path(served_env["UCLIP_BUNDLE"]),
                                         Path(served_env["XDG_CACHE_HOME"])) as (client, _, _):
        yield client


def api_names(client, **params) -> list[str]:
    response = client.get("/api/search", params={"top": "100", **params})
    assert response.status_code == 200, response.text
    return [r["name"] for r in response.json()["results"]]


@pytest.mark.parametrize("params, expected", [
    (dict(q="a photo", after="2019-06", before="2019-09"), {"beach.jpg", "split.jpg", "june_first.jpg"}),
    (dict(q="a photo", camera="pixel 7"), {"beach.jpg", "winter.jpg"}),
    (dict(q="a photo", near="45.81,15.98", within="300km"), {"beach.jpg", "split.jpg"}),
    (dict(q="a photo", gps="1"), {"beach.jpg", "split.jpg", "sydney.jpg"}),
    (dict(q="a photo", shape="portrait"), {"split.jpg", "winter.jpg"}),
    (dict(q="pláž after:2019-06 camera:pixel"), {"beach.jpg", "winter.jpg"}),
    (dict(q="photo camera:pixel", before="2019-09"), {"beach.jpg"}),
])
def test_api_filters_select_exactly_their_photos(api, params, expected):
    assert set(api_names(api, **params)) == expected


def test_api_top_counts_photos_that_pass_and_results_carry_metadata(api):
    everything = api_names(api, q="a photo")
    passing = [n for n in everything if n in {"bad_date.jpg", *PLAIN}]
    response = api.get("/api/search", params={"q": "a photo", "after": "2020", "top": "2"}).json()
    assert [r["name"] for r in response["results"]] == passing[:2] and response["more"] is True
    beach = api.get("/api/search", params={"q": "a photo", "camera": "pixel",
                                           "shape": "landscape"}).json()["results"][0]
    assert (beach["name"], beach["taken"], beach["taken_source"], beach["camera"]) == (
        "beach.jpg", "2019-07-14T10:00:00", "exif", "Google Pixel 7")
    assert beach["lat"] == pytest.approx(ZAGREB[0], abs=1e-6) and (beach["width"], beach["height"]) == (96, 64)


def test_api_similar_takes_the_filters(api):
    beach = api.get("/api/search", params={"q": "a photo", "camera": "pixel", "shape": "landscape"}).json()["results"][0]
    similar = api.get(f"/api/similar/{beach['id']}", params={"camera": "pixel", "top": "100"}).json()
    assert [r["name"] for r in similar["results"]] == ["winter.jpg"]


def test_api_sort_and_filters_alone(api):
    assert api_names(api, q="a photo", gps="1", sort="date") == ["sydney.jpg", "beach.jpg", "split.jpg"]
    alone = api.get("/api/search", params={"q": "camera:pixel"}).json()
    assert [r["name"] for r in alone["results"]] == ["winter.jpg", "beach.jpg"]
    assert alone["query"]["kind"] == "filters" and all(r["score"] is None for r in alone["results"])


def test_api_filters_nothing_passes_is_an_empty_answer_that_says_so(api):
    for q in ("a photo", "camera:leica"):
        body = api.get("/api/search", params={"q": q, "camera": "leica", "gps": "1"}).json()
        assert body["results"] == [] and any(
            "no photo in the index" in n and "camera=leica gps=1" in n for n in body["notes"]), body


@pytest.mark.parametrize("params, named", [
    (dict(after="2019-13"), "after=2019-13"),
    (dict(near="91,0"), "near=91,0"),
    (dict(within="5km"), "within=5km"),
    (dict(gps="maybe"), "gps='maybe'"),
    (dict(shape="round"), "shape=round"),
    (dict(sort="size"), "sort='size'"),
    (dict(q="party after:midnight"), "after:midnight"),
])
def test_api_bad_filters_are_one_line_errors(api, params, named):
    response = api.get("/api/search", params={"q": "a photo", **params})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and named in body["error"], body


# ------------------------------------------------------------------------------------------ the approximate path


def test_filters_go_into_the_approximate_search_as_its_bitmap(tmp_path, monkeypatch):
    """A filter keeping more rows than the exact scan takes travels into faiss (the bitmap the folder filter
    uses): every answer passes, equals the exact filtered answer (every list probed), and holds k photos."""
    from optional import needs

    needs("faiss", "the approximate index: pip install '.[ann]'")
    import numpy as np

    from uclip_cli.index import ann_index, search
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.records import Embedded, PhotoMeta
    from uclip_cli.photo_search import search_rows
    from uclip_cli.filters import read_filters
    from uclip_cli.walk import FileEntry

    d, rows = 16, 600
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cameras = ["Google|Pixel 7", "Apple|iPhone 8", "Canon|Canon EOS R5"]
    meta = [PhotoMeta(taken=f"{2015 + i % 8}-0{1 + i % 9}-1{i % 10}T12:00:00", taken_source="exif",
                      make=cameras[i % 3].split("|")[0], model=cameras[i % 3].split("|")[1]) for i in range(rows)]
    with open_index(tmp_path / "idx", IndexIdentity("img", "heads", d, d, "t"), "create") as store:
        store.add_batch([Embedded(FileEntry(path=Path(f"/p/{i}.jpg"), root=Path("/p"), size=1, mtime_ns=1), f"{i:032x}",
                                  meta[i]) for i in range(rows)], vectors, vectors)
        store.set_setting("ann_mode", "on")
    monkeypatch.setattr(search, "EXACT_SELECTED_ROWS", 10)
    monkeypatch.setattr(ann_index, "DEFAULT_NPROBE_SHARE", 1.0)
    monkeypatch.setattr(search, "MIN_CANDIDATES", 10 * rows)
    photo_filter = read_filters([("camera", "pixel", "c"), ("after", "2019", "a")])
    passing = {i for i in range(rows) if i % 3 == 0 and meta[i].taken >= "2019"}
    with open_index(tmp_path / "idx") as reader:
        for q in vectors[:5] + 0.1:
            q = q / np.linalg.norm(q)
            info: dict = {}
            found, _ = search_rows(reader, q, 20, photo_filter=photo_filter, info=info)
            assert info["index"] == "ann" and len(found) == 20 and set(found.tolist()) <= passing
            assert found.tolist() == search_rows(reader, q, 20, photo_filter=photo_filter, exact=True)[0].tolist()


# ------------------------------------------------------------------------------------------ values cameras got wrong


def test_metadata_a_camera_wrote_wrong_is_dropped_not_guessed(tmp_path):
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational

    from image_fixtures import jpeg_bytes, photo_like
    from uclip_cli.photo_meta import meta_of_bytes

    exif = Image.Exif()
    exif[0x0110] = "Pixel 7\x00\x00   "                      # padded with NULs and blanks, as some cameras do
    exif[0x0112] = 42                                       # no orientation
    exif.get_ifd(0x8769)[0x9003] = "2019:02:30 25:00:00"      # no such time
    exif.get_ifd(0x8769)[0x9011] = "+2h"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(45, 1), IFDRational(1, 0), IFDRational(0, 1))   # a zero denominator
    gps[3], gps[4] = "E", (IFDRational(15, 1), IFDRational(0, 1), IFDRational(0, 1))
    meta = meta_of_bytes(jpeg_bytes(photo_like(32, 24, seed=1), exif=exif.tobytes()), mtime_ns=0)
    assert meta.model == "Pixel 7" and meta.orientation is None and (meta.width, meta.height) == (32, 24)
    assert meta.taken_source == "mtime" and meta.taken_offset is None
    assert meta.lat is None and meta.lon is None
    assert meta_of_bytes(b"not an image", mtime_ns=0) is None


# ------------------------------------------------------------------------------------------ the page


def test_the_page_filters_keep_them_in_the_url_and_list_filters_alone(library, served_env, tmp_path):
    """The page's filter controls in a real headless Chromium: each narrows the results, the URL keeps them
    (a reload restores the controls and the answer), filters alone list the photos that pass, a bad value
    is the API's one line."""
    from test_serve_browser import ALL_LOADED, CARDS, _browser_or_skip, screenshot, served_page, until

    _browser_or_skip()

    shown = f"{CARDS}.map(p => p.split('/').pop())"
    with served_page(served_env, tmp_path / "profile") as (server, page, problems):
        page.goto(server.url)
        page.fill("#q", "a photo")
        page.fill("#camera", "pixel")
        page.press("#q", "Enter")
        until(page, ALL_LOADED)
        assert set(page.evaluate(shown)) == {"beach.jpg", "winter.jpg"}
        assert "camera=pixel" in page.evaluate("location.search")

        page.select_option("#shape", "portrait")
        until(page, f"{shown}.length === 1")
        assert page.evaluate(shown) == ["winter.jpg"]
        assert "shape=portrait" in page.evaluate("location.search")
        screenshot(page, tmp_path, "filters.png")

        page.goto(page.url)                                   # a reload (a bookmark, a shared link)
        until(page, ALL_LOADED)
        assert page.evaluate(shown) == ["winter.jpg"]
        assert page.input_value("#camera") == "pixel" and page.input_value("#shape") == "portrait"

        page.fill("#q", "")
        page.select_option("#shape", "")
        page.check("#gps")
        page.press("#q", "Enter")                             # filters alone: newest first, dates shown
        until(page, f"{shown}.length === 1 && document.getElementById('grid').getAttribute('aria-busy') === 'false'")
        assert page.evaluate(shown) == ["beach.jpg"]
        assert page.evaluate("document.querySelector('#grid .score').textContent") == "2019-07-14"

        page.fill("#after", "2019-13")
        page.dispatch_event("#after", "change")
        until(page, "document.getElementById('message').classList.contains('error')")
        assert "after=2019-13" in page.evaluate("document.getElementById('message').textContent")
        assert not problems, problems

"""The page's "Duplicates" view (static/dupes.js) in a real headless Chromium against a real `uclip serve`:
groups of near copies largest first with their sizes, thumbnails that really load, capture times from the
photos' EXIF and their paths, the view kept in the URL (a reload opens it again), and a search leaving it.

The photos are JPEGs written with Pillow, each with an EXIF DateTimeOriginal: one photo with three near
copies (resized, re-saved at another quality, cropped by 2 pixels) and an exact copy at another path (5
files), a second photo with one resized copy (2 files), and unrelated photos. The tiny test bundle's image
tower has random weights, so the threshold is measured from its features (as tests/test_dupes.py does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_helpers import index_vectors, invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from test_dupes import MARGIN

GROUPS = {   # name -> (seed, size, quality, crop, EXIF DateTimeOriginal)
    "beach.jpg": (7, (320, 240), 92, False, "2019:07:14 10:00:00"),
    "edits/beach_small.jpg": (7, (160, 120), 92, False, "2019:07:14 10:00:01"),
    "edits/beach_q60.jpg": (7, (320, 240), 60, False, "2019:07:14 10:00:02"),
    "edits/beach_crop.jpg": (7, (320, 240), 92, True, "2019:07:14 10:00:03"),
    "other/beach_exact.jpg": (7, (320, 240), 92, False, "2019:07:14 10:00:00"),   # beach.jpg's very bytes
    "hills.jpg": (8, (240, 180), 90, False, "2020:03:01 08:30:00"),
    "edits/hills_small.jpg": (8, (120, 90), 90, False, "2020:03:01 08:30:00"),
}
UNRELATED = {f"other/photo_{seed}.jpg": seed for seed in (11, 23, 41, 59)}


def exif_taken(taken: str) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = taken          # DateTimeOriginal, as a camera writes it
    return exif.tobytes()


def near_copy(seed: int, size: tuple[int, int], quality: int, crop: bool, taken: str) -> bytes:
    picture = photo_like(*((320, 240) if seed == 7 else (240, 180)), seed=seed)
    if crop:
        picture = picture.crop((2, 2, picture.width - 2, picture.height - 2))
    if picture.size != size and not crop:
        picture = picture.resize(size)
    return jpeg_bytes(picture, quality=quality, exif=exif_taken(taken))


@dataclass(frozen=True)
class Site:
    photos: Path
    env: dict
    threshold: float


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_bundle) -> Site:
    from test_serve_browser import _browser_or_skip

    _browser_or_skip()
    home = tmp_path_factory.mktemp("dupes_page")
    photos = (home / "photos").resolve()
    for name, spec in GROUPS.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(near_copy(*spec))
    assert (photos / "beach.jpg").read_bytes() == (photos / "other/beach_exact.jpg").read_bytes()
    for name, seed in UNRELATED.items():
        (photos / name).write_bytes(jpeg_bytes(photo_like(320, 240, seed=seed), exif=exif_taken("2018:01:01 12:00:00")))
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    features = index_vectors(home / "index", "features")
    groups = [[str(photos / n) for n in GROUPS if n.split("/")[-1].startswith(stem)] for stem in ("beach", "hills")]
    every = [str(photos / n) for n in [*GROUPS, *UNRELATED]]
    lowest_near = min(float(features[g[0]] @ features[p]) for g in groups for p in g[1:])
    highest_far = max(float(features[a] @ features[b]) for a in every for b in every
                      if a < b and not any(a in g and b in g for g in groups))
    assert lowest_near - highest_far > 2 * MARGIN, (lowest_near, highest_far)
    return Site(photos, env, round((lowest_near + highest_far) / 2, 4))


GROUP_TITLES = "[...document.querySelectorAll('#dupes-list .dupe-size')].map(h => h.textContent)"
THUMBS = "[...document.querySelectorAll('#dupes-list img')]"
LOADED = (f"document.getElementById('dupes-list').getAttribute('aria-busy') === 'false' && {THUMBS}.length > 0 && "
          f"{THUMBS}.every(i => i.complete && i.naturalWidth > 0)")
GROUP_PATHS = ("[...document.querySelectorAll('#dupes-list .dupe-group')].map(g => "
               "[...g.querySelectorAll('.dupe-path')].map(p => p.textContent))")


def test_the_duplicates_view_shows_groups_largest_first_and_the_url_restores_it(site, tmp_path):
    from test_serve_browser import CARDS, screenshot, served_page, until

    with served_page(site.env, tmp_path / "profile", height=900, console_errors=True) as (server, page, problems):
        page.goto(server.url)
        until(page, "document.getElementById('about').textContent.includes('photos')")
        page.click("#dupes-button")
        until(page, "!document.getElementById('dupes').hidden && "
                    "document.getElementById('dupes-list').getAttribute('aria-busy') === 'false'")
        assert "dupes=0.95" in page.evaluate("location.search")       # the default, in the URL

        page.fill("#dupes-threshold", str(site.threshold))
        page.dispatch_event("#dupes-threshold", "change")
        until(page, f"{GROUP_TITLES}.length === 2 && {LOADED}")
        assert page.evaluate(GROUP_TITLES) == ["Group 1: 5 files (4 different, the rest exact copies)",
                                               "Group 2: 2 files"]
        shown = [[p.split("\n") for p in group] for group in page.evaluate(GROUP_PATHS)]
        beach = {str(site.photos / n) for n in GROUPS if "beach" in n}
        assert {p for member in shown[0] for p in member} == beach
        assert sorted(shown[0][0]) == [str(site.photos / "beach.jpg"), str(site.photos / "other/beach_exact.jpg")]
        assert {p for member in shown[1] for p in member} == {str(site.photos / "hills.jpg"),
                                                              str(site.photos / "edits/hills_small.jpg")}
        facts = dict(page.evaluate("[...document.querySelectorAll('#dupes-list .dupe-caption')].map(c => "
                                   "[c.querySelector('.dupe-path').textContent.split('\\n')[0], "
                                   "c.querySelector('.dupe-facts').textContent])"))
        first = facts[str(site.photos / "beach.jpg")]
        assert first.startswith("largest · 320×240 · ") and "2019-07-14 10:00:00" in first
        small = facts[str(site.photos / "edits/beach_small.jpg")]
        assert small.startswith("cosine ") and "160×120" in small and "2019-07-14 10:00:01" in small
        widths = page.evaluate(f"{THUMBS}.map(i => i.naturalWidth)")
        assert len(widths) == 6 and all(0 < w <= 256 for w in widths)        # 4 + 2 distinct photos
        assert f"dupes={site.threshold}" in page.evaluate("location.search")
        summary = page.evaluate("document.getElementById('dupes-summary').textContent")
        assert summary.startswith("2 groups of near-duplicates among 10 photos") and "Nothing is deleted" in summary
        screenshot(page, tmp_path, "serve-dupes.png")

        page.goto(page.url)                                   # a reload, a bookmark, a shared link
        until(page, f"{GROUP_TITLES}.length === 2 && {LOADED}")
        assert page.input_value("#dupes-threshold") == str(site.threshold)
        assert [[p.split("\n") for p in g] for g in page.evaluate(GROUP_PATHS)] == shown

        page.fill("#folder", str(site.photos / "edits"))        # the folder narrows the groups too
        page.dispatch_event("#folder", "change")
        until(page, f"{GROUP_TITLES}.length === 1 && {LOADED}")
        assert page.evaluate(GROUP_TITLES) == ["Group 1: 3 files"]
        assert "in=" in page.evaluate("location.search")
        page.fill("#folder", "")

        page.fill("#q", "a photo")                             # a search leaves the view
        page.press("#q", "Enter")
        until(page, f"document.getElementById('dupes').hidden && {CARDS}.length > 0")
        assert "dupes=" not in page.evaluate("location.search") and "q=" in page.evaluate("location.search")
        assert problems == [], problems


def test_a_bad_threshold_in_the_url_is_the_servers_one_line(site, tmp_path):
    from test_serve_browser import served_page, until

    with served_page(site.env, tmp_path / "profile") as (server, page, _):
        page.goto(server.base + "/?dupes=0.2")
        until(page, "document.getElementById('dupes-summary').classList.contains('error')")
        assert "threshold" in page.evaluate("document.getElementById('dupes-summary').textContent")
        assert page.evaluate("document.querySelectorAll('#dupes-list .dupe-group').length") == 0

"""Tags in any language (issue 23 item 4), the mechanics over the tiny test bundle: `uclip tag` gives a photo a
label exactly when its score (the label's query cosine less the neutral prompts' mean, as `uclip query` scores
them) passes the label's stored threshold; `tag:` / `--tag` / `tag=` filter before the top -n on the CLI, the
API and the approximate index; re-runs score only new labels and only new photos; tags of other heads are
never served; `uclip tags` lists them; bad input is one line; no photo is ever dropped.

The tiny bundle's weights are random, so which photo fits which label means nothing here, and its scores sit
in a narrow band: these tests put every label's threshold at the library's median (SPREADS 0) and, but where
they test it, drop the neutral prompts' condition, so that about half the photos hold each label. The calibration itself is judged on real photos and real weights
(tests/test_real_e2e.py::test_tags_in_several_languages_find_the_labelled_photos).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import copy_tree, invoke_uclip, uclip_env
from image_fixtures import write_exif_photo

import uclip_cli.tags as T

LABELS = ["pláž", "hory", "kočka", "jídlo"]
ALL = ["-n", "100", "--format", "json"]
TIE = 1e-4          # scores printed to 6 decimals from float32 runs: closer to the threshold than this is a tie


def tag(env, *args, neutral: bool = False, spreads: float = 0.0) -> dict:
    """`uclip tag ARGS --format json` with every new label's threshold at its median score (or `spreads` robust
    standard deviations from it), and the neutral prompts' condition only when `neutral`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T, "SPREADS", spreads)
        if not neutral:
            patch.setattr(T, "MIN_MARGIN", -2.0)      # a difference of cosines is never below -2
        return json.loads(invoke_uclip(["tag", *args, "--format", "json"], env).ok().stdout)


def names(env, *args) -> list[str]:
    out = json.loads(invoke_uclip(["query", *map(str, args), *ALL], env).ok().stdout)
    return [Path(r["path"]).name for r in out["results"]]


def scores(env, text: str) -> dict[str, float]:
    out = json.loads(invoke_uclip(["query", text, "--text", "--exact", *ALL], env).ok().stdout)
    return {Path(r["path"]).name: r["score"] for r in out["results"]}


def margins(env, label: str) -> dict[str, float]:
    """Each photo's score for `label` less its mean score for the neutral prompts, from `uclip query` alone."""
    label_scores = scores(env, label)
    neutral = [scores(env, p) for p in T.NEUTRAL_PROMPTS]
    return {name: s - float(np.mean([n[name] for n in neutral])) for name, s in label_scores.items()}


def expected(env, label: str, threshold: float, neutral: bool = False) -> tuple[set[str], set[str]]:
    """(photos that must hold the label, photos too close to a threshold to say), as tags.py's docstring defines
    it, from the scores `uclip query` prints."""
    s, m = scores(env, label), margins(env, label) if neutral else None
    must = {n for n in s if s[n] > threshold + TIE and (m is None or m[n] > T.MIN_MARGIN + TIE)}
    ties = {n for n in s if abs(s[n] - threshold) <= TIE or (m is not None and abs(m[n] - T.MIN_MARGIN) <= TIE)}
    return must, ties


def holding(env, label: str) -> set[str]:
    """The photos `uclip query tag:LABEL` lists (none: its one-line answer that no photo passes)."""
    result = invoke_uclip(["query", f'tag:"{label}"', *ALL], env)
    if result.code == 2 and "no photo in the index" in result.one_line_error():
        return set()
    return {Path(r["path"]).name for r in json.loads(result.ok().stdout)["results"]}


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_bundle):
    from serve_helpers import bundle_with_heads

    home = tmp_path_factory.mktemp("tags_home")
    photos = (home / "photos").resolve()
    for seed in range(12):
        write_exif_photo(photos / f"p{seed:02d}.jpg", seed, taken=f"2019:0{1 + seed % 9}:01 12:00:00")
    bundle = bundle_with_heads(tiny_bundle, home / "bundle")
    env = uclip_env(home, bundle=bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    first = tag(env, ", ".join(LABELS))
    return photos, home / "index", env, first


def thresholds(out: dict) -> dict[str, float]:
    return {x["label"]: x["threshold"] for x in out["labels"]}


# ------------------------------------------------------------------------------------------ scoring


def test_a_photo_holds_a_label_exactly_when_its_score_passes_the_threshold(library):
    _, _, env, first = library
    assert {x["label"] for x in first["labels"]} == set(LABELS) and first["photos"] == 12
    assert all(x["action"] == "new" for x in first["labels"])
    for label, threshold in thresholds(first).items():
        must, ties = expected(env, label, threshold)
        got = holding(env, label)
        assert must <= got and got <= must | ties, (label, threshold, sorted(got), sorted(must))
        assert 0 < len(got) < 12       # the median: about half


def test_the_threshold_is_the_calibration_of_the_librarys_scores(library):
    _, _, env, first = library
    for label, threshold in thresholds(first).items():
        s = np.array(list(scores(env, label).values()), dtype=np.float64)
        assert threshold == pytest.approx(np.median(s), abs=TIE)        # SPREADS 0 in these tests


def test_calibration_stands_a_minority_out_of_the_bulk():
    """Real constants: 90 photos of the bulk and 10 that fit the label; a broken spread or centre fails."""
    rng = np.random.default_rng(0)
    bulk, fit = rng.normal(-0.05, 0.01, 90), rng.normal(0.08, 0.01, 10)
    threshold = T.calibrate(np.concatenate([bulk, fit]))
    assert (fit > threshold).all() and (bulk > threshold).sum() <= 1
    assert T.calibrate(bulk) > np.percentile(bulk, 99) - 0.01        # no label on most of a label-free library
    assert T.calibrate(np.array([0.3, 0.2, 0.25])) == T.NO_THRESHOLD   # too few photos: the neutral margin decides


def test_a_photo_must_also_beat_the_neutral_prompts(library, tmp_path):
    """With the library's threshold far below every score, the neutral prompts' condition alone decides."""
    _, index, env, _ = library
    env = {**env, "UCLIP_INDEX": str(copy_tree(index, tmp_path / "index"))}
    new = ["a photo", "an image", "a picture", "moře"]     # the neutral prompts' own words: some photos lean each way
    out = tag(env, ", ".join(new), neutral=True, spreads=-1e6)
    held = {}
    for label, threshold in thresholds(out).items():
        if label in new:
            must, ties = expected(env, label, threshold, neutral=True)
            held[label] = holding(env, label)
            assert must <= held[label] <= must | ties, (label, sorted(held[label]))
    assert any(0 < len(h) < 12 for h in held.values()), held       # the condition keeps some photos out


# ------------------------------------------------------------------------------------------ filters


def test_tag_filters_in_the_query_text_and_as_option_count_matching_photos(library):
    _, _, env, _ = library
    cats = holding(env, "kočka")
    best = names(env, "a photo", "--tag", "kočka")
    assert set(best) == cats
    two = names(env, "a photo tag:Kočka", "-n", "2")[:2]
    assert two == best[:2]                             # -n 2: the 2 best photos that hold it
    out = json.loads(invoke_uclip(["query", "a photo", "--tag", "KOČKA", "-n", "2", "--format", "json"], env).ok().stdout)
    assert [Path(r["path"]).name for r in out["results"]] == best[:2]
    both = holding(env, "kočka") & holding(env, "hory")
    assert set(names(env, "a photo tag:kočka", "--tag", "hory")) == both
    assert set(names(env, "tag:kočka after:2019-05")) == {n for n in cats if int(n[1:3]) % 9 >= 4}


def test_tags_on_the_approximate_path_filter_before_the_top_k(tmp_path, monkeypatch):
    """A tag filter travels into faiss as the folder filter's bitmap: every answer holds the tag, k of them, as
    the exact filtered answer."""
    from optional import needs

    needs("faiss", "the approximate index: pip install '.[ann]'")
    from uclip_cli.filters import read_filters
    from uclip_cli.index import ann_index, search
    from uclip_cli.index.access import open_index
    from uclip_cli.index.identity import IndexIdentity
    from uclip_cli.index.photo_tags import Given, Label
    from uclip_cli.index.records import Embedded
    from uclip_cli.photo_search import search_rows
    from uclip_cli.walk import FileEntry

    d, rows = 16, 600
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with open_index(tmp_path / "idx", IndexIdentity("img", "heads", d, d, "t"), "create") as store:
        store.add_batch([Embedded(FileEntry(path=Path(f"/p/{i}.jpg"), root=Path("/p"), size=1, mtime_ns=1), f"{i:032x}")
                         for i in range(rows)], vectors, vectors)
        store.set_setting("ann_mode", "on")
        tags = store.details.tags
        tags.commit([Given(Label("kočka", "Kočka", tags.model, 0.0, np.zeros(d, np.float32), np.zeros(d, np.float32)),
                           [(f"{i:032x}", 1.0) for i in range(0, rows, 3)], replace=True)], [f"{i:032x}" for i in range(rows)])
    monkeypatch.setattr(search, "EXACT_SELECTED_ROWS", 10)
    monkeypatch.setattr(ann_index, "DEFAULT_NPROBE_SHARE", 1.0)
    monkeypatch.setattr(search, "MIN_CANDIDATES", 10 * rows)
    photo_filter = read_filters([("tag", "KOČKA", "tag:KOČKA")])
    with open_index(tmp_path / "idx") as reader:
        for q in vectors[:5] + 0.1:
            q = q / np.linalg.norm(q)
            info: dict = {}
            found, _ = search_rows(reader, q, 20, photo_filter=photo_filter, info=info)
            assert info["index"] == "ann" and len(found) == 20 and all(r % 3 == 0 for r in found.tolist())
            assert found.tolist() == search_rows(reader, q, 20, photo_filter=photo_filter, exact=True)[0].tolist()


# ------------------------------------------------------------------------------------------ incremental


def test_new_labels_alone_are_scored_and_new_photos_get_the_stored_labels(library, tmp_path, monkeypatch):
    photos, index, env, first = library
    photos, index = copy_tree(photos, tmp_path / "photos"), copy_tree(index, tmp_path / "index")
    env = {**env, "UCLIP_INDEX": str(index)}
    invoke_uclip(["index", photos, "--no-progress"], env).ok()      # the copied folder: same content, same tags
    before = {label: holding(env, label) for label in LABELS}
    encoded: list[list[str]] = []
    real = T.label_vectors
    monkeypatch.setattr(T, "label_vectors", lambda encoders, labels: encoded.append(list(labels)) or real(encoders, labels))

    again = tag(env, "kočka, Moře")
    assert encoded == [["Moře"]]                                       # kočka is stored: not scored again
    actions = {x["label"]: x["action"] for x in again["labels"]}
    assert actions == {"pláž": "kept", "hory": "kept", "kočka": "kept", "jídlo": "kept", "Moře": "new"}
    assert {k: v for k, v in thresholds(again).items() if k != "Moře"} == thresholds(first)
    assert {label: holding(env, label) for label in LABELS} == before

    for seed in range(50, 53):
        write_exif_photo(photos / f"new{seed}.jpg", seed)
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    listed = json.loads(invoke_uclip(["tags", "--format", "json"], env).ok().stdout)
    assert listed["untagged"] == 3
    note = invoke_uclip(["query", "tag:kočka", *ALL], env).ok().stderr
    assert "3 photos were indexed since the last `uclip tag`" in note
    encoded.clear()
    applied = tag(env)
    assert encoded == [] and applied["scored_photos"] == 3 and thresholds(applied) == thresholds(again)
    for label, threshold in thresholds(applied).items():
        must, ties = expected(env, label, threshold)
        got = holding(env, label)
        assert must <= got <= must | ties, label
        if label in before:                            # the photos tagged before keep exactly their tags
            assert got - {f"new{s}.jpg" for s in range(50, 53)} == before[label], label
    assert json.loads(invoke_uclip(["tags", "--format", "json"], env).ok().stdout)["untagged"] == 0


def test_tags_of_other_heads_are_never_served_and_a_rerun_scores_them_again(library, tmp_path):
    from serve_helpers import write_random_heads

    from cli_helpers import copy_bundle

    photos, index, env, _ = library
    bundle = copy_bundle(Path(env["UCLIP_BUNDLE"]), tmp_path / "bundle")
    write_random_heads(bundle, seed=7)
    env = {**env, "UCLIP_BUNDLE": str(bundle), "UCLIP_INDEX": str(copy_tree(index, tmp_path / "index"))}
    error = invoke_uclip(["query", "a photo tag:kočka"], env).one_line_error()     # projected in memory: other heads
    assert "tag:kočka" in error and "run `uclip tag`" in error
    projected_env = {**env, "UCLIP_INDEX": str(copy_tree(Path(env["UCLIP_INDEX"]), tmp_path / "projected"))}
    with pytest.MonkeyPatch.context() as patch:                      # tagged through the projection, not re-indexed
        patch.setattr(T, "SPREADS", 0.0)
        patch.setattr(T, "MIN_MARGIN", -2.0)
        projected = invoke_uclip(["tag", "--format", "json"], projected_env).ok()
    assert "projected in memory" in projected.stderr
    out = json.loads(projected.stdout)
    assert {x["action"] for x in out["labels"]} == {"rescored"}
    for label, threshold in thresholds(out).items():
        must, ties = expected(projected_env, label, threshold)
        assert must <= holding(projected_env, label) <= must | ties, label
    invoke_uclip(["index", photos, "--no-progress"], env).ok()                     # re-projected for good
    assert "tag:kočka" in invoke_uclip(["query", "tag:kočka"], env).one_line_error()
    listed = json.loads(invoke_uclip(["tags", "--format", "json"], env).ok().stdout)
    assert all(x["stale"] and x["photos"] == 0 for x in listed["labels"])
    again = tag(env)
    assert {x["action"] for x in again["labels"]} == {"rescored"}
    for label, threshold in thresholds(again).items():
        must, ties = expected(env, label, threshold)
        assert must <= holding(env, label) <= must | ties, label


# ------------------------------------------------------------------------------------------ listing and removing


def test_tags_lists_labels_with_counts(library):
    _, _, env, _ = library
    listed = json.loads(invoke_uclip(["tags", "--format", "json"], env).ok().stdout)
    assert listed["photos"] == 12 and listed["untagged"] == 0
    assert {x["label"]: x["photos"] for x in listed["labels"]} == {label: len(holding(env, label)) for label in LABELS}
    table = invoke_uclip(["tags"], env).ok().stdout.splitlines()
    assert table[0].split() == ["photos", "label"] and len(table) == 1 + len(LABELS)
    assert {line.split(None, 1)[1] for line in table[1:]} == set(LABELS)


def test_remove_and_clear_drop_tags_never_photos(library, tmp_path):
    _, index, env, _ = library
    env = {**env, "UCLIP_INDEX": str(copy_tree(index, tmp_path / "index"))}
    out = invoke_uclip(["tag", "--remove", "HORY"], env).ok().stdout
    assert "removed the label 'hory'" in out
    assert {x["label"] for x in json.loads(invoke_uclip(["tags", "-f", "json"], env).ok().stdout)["labels"]} == \
        {"pláž", "kočka", "jídlo"}
    assert "no such label" in invoke_uclip(["tag", "--remove", "moře"], env).one_line_error()
    invoke_uclip(["tag", "--clear"], env).ok()
    assert invoke_uclip(["tags"], env).ok().stdout.startswith("no tags yet")
    assert "has no tags yet" in invoke_uclip(["query", "a photo tag:kočka"], env).one_line_error()
    assert len(names(env, "a photo")) == 12
    with sqlite3.connect(Path(env["UCLIP_INDEX"]) / "catalog.sqlite") as c:
        assert c.execute("SELECT COUNT(*) FROM files WHERE row IS NOT NULL").fetchone()[0] == 12


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, named", [
    (["tag", " , ,"], "LABELS: no label in it"),
    (["tag", "--file", "/nonexistent/labels.txt"], "--file /nonexistent/labels.txt"),
    (["tag", "x" * 300], "at most 200 characters"),
    (["tag", "cat", "--remove", "dog"], "not both"),
    (["query", "a photo tag:pes"], "tag:pes: no such tag"),
    (["query", "tag:pes"], "its tags: hory, jídlo, kočka, pláž"),
    (["query", "a photo", "--tag", " "], "--tag  : give a label"),
    (["tags", "--format", "paths"], "--format"),
])
def test_bad_input_is_one_line(library, args, named):
    _, _, env, _ = library
    result = invoke_uclip(args, env)
    if args[-2:] == ["--format", "paths"]:
        assert result.code == 2 and "--format" in result.stderr and "Traceback" not in result.stderr
        return
    assert named in result.one_line_error()


def test_no_labels_no_index_no_photos_are_one_line(tmp_path, tiny_bundle):
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    for args in (["tag", "cat"], ["tags"], ["query", "tag:cat"]):
        assert "no index at" in invoke_uclip(args, env).one_line_error()
    (tmp_path / "photos").mkdir()
    invoke_uclip(["index", tmp_path / "photos", "--no-progress"], env).ok()
    assert "holds no photos yet" in invoke_uclip(["tag", "cat"], env).one_line_error()
    assert "no labels yet" in invoke_uclip(["tag"], env).one_line_error()
    assert "holds no photos yet" in invoke_uclip(["query", "tag:cat"], env).one_line_error()
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xff\xfe bad")
    assert "not UTF-8" in invoke_uclip(["tag", "--file", labels], env).one_line_error()


def test_a_file_of_labels_in_several_languages(library, tmp_path):
    _, index, env, _ = library
    env = {**env, "UCLIP_INDEX": str(copy_tree(index, tmp_path / "index"))}
    labels = tmp_path / "labels.txt"
    labels.write_text("Strand\n\n  猫  \nplaža\nSTRAND\n", encoding="utf-8")
    out = tag(env, "--file", labels)
    assert [x["label"] for x in out["labels"] if x["action"] == "new"] and \
        {x["label"] for x in out["labels"] if x["action"] == "new"} == {"Strand", "猫", "plaža"}


# ------------------------------------------------------------------------------------------ the JSON API


@pytest.fixture(scope="module")
def api(library, tmp_path_factory):
    from serve_helpers import environment, needs, served

    needs("starlette", "the serve extra: pip install '.[serve]'")
    _, index, env, _ = library
    with environment(env), served(index, Path(env["UCLIP_BUNDLE"]), tmp_path_factory.mktemp("tags_cache")) as (client, _, _):
        yield client


def test_api_lists_tags_and_filters_by_them(api, library):
    _, _, env, _ = library
    listed = api.get("/api/tags")
    assert listed.status_code == 200, listed.text
    assert {x["label"]: x["photos"] for x in listed.json()["labels"]} == {label: len(holding(env, label)) for label in LABELS}
    for params in ({"q": "a photo", "tag": "kočka"}, {"q": "a photo tag:kočka"}, {"q": "tag:Kočka"}):
        body = api.get("/api/search", params={"top": "100", **params}).json()
        assert {r["name"] for r in body["results"]} == holding(env, "kočka"), params
    two = api.get("/api/search", params={"q": "a photo", "tag": "kočka", "top": "2"}).json()
    assert [r["name"] for r in two["results"]] == names(env, "a photo", "--tag", "kočka")[:2]
    missing = api.get("/api/search", params={"q": "a photo", "tag": "pes"}).json()
    assert missing["results"] == [] and any("tag:pes: no such tag" in n for n in missing["notes"])


# ------------------------------------------------------------------------------------------ the page


def test_the_page_offers_the_tags_and_keeps_the_chosen_one_in_the_url(library, tmp_path):
    """In a real headless Chromium: the tag control lists the labels with their counts, choosing one narrows the
    results to the photos holding it, the URL keeps it and a reload restores it."""
    from test_serve_browser import ALL_LOADED, CARDS, _browser_or_skip, screenshot, served_page, until

    _browser_or_skip()

    _, _, env, _ = library
    cats = holding(env, "kočka")
    shown = f"{CARDS}.map(p => p.split('/').pop())"
    with served_page(env, tmp_path / "profile") as (server, page, problems):
        page.goto(server.url)
        until(page, "document.querySelectorAll('#tag option').length > 1")
        options = page.evaluate("[...document.querySelectorAll('#tag option')].map(o => [o.value, o.textContent])")
        assert dict(options[1:]) == {label: f"{label} ({len(holding(env, label))})" for label in LABELS}
        assert page.is_visible("#tag")
        page.fill("#q", "a photo")
        page.select_option("#tag", "kočka")
        page.press("#q", "Enter")
        until(page, ALL_LOADED)
        until(page, f"{shown}.length === {len(cats)}")
        assert set(page.evaluate(shown)) == cats
        assert "tag=ko%C4%8Dka" in page.evaluate("location.search")
        screenshot(page, tmp_path, "tags.png")
        page.goto(page.url)                                   # a reload (a bookmark, a shared link)
        until(page, ALL_LOADED)
        assert page.input_value("#tag") == "kočka" and set(page.evaluate(shown)) == cats
        assert not problems, problems

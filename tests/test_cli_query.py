"""`uclip query` and `uclip doctor` end to end: formats, golden JSON, image-as-query, and one-line errors.

Golden files (tests/golden/*.json) store paths relative to the fixture folder, best first, and the
exact (float64) score of each: the tiny towers rerun in float64 on the inputs uclip gives them. A
query's float32 scores may differ from those by what float32 rounding explains on any CPU (a bound
propagated through the towers and the dot product, uclip_cli/export/rounding.py) plus the printed
decimals; a change to the models or the pipeline moves them further. Regenerate them after a
deliberate change with
    UCLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_cli_query.py
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_helpers import (bundle_with_other_image_encoder, copy_bundle, flip_one_byte, invoke_uclip,
                         relative_to, run_uclip, uclip_env)
from exact_towers import exact_tower, normalised, pixels_of
from image_fixtures import jpeg_bytes, make_photo_folder, photo_like

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("UCLIP_UPDATE_GOLDEN") == "1"
JSON_DECIMALS = 6     # `--format json` rounds scores to 6 decimals
GOLDEN_DECIMALS = 9
ALL = ["--top", "100"]


@dataclass(frozen=True)
class Indexed:
    photos: Path
    index: Path
    bundle: Path
    env: dict
    searchable: list[str]    # relative paths of every indexed image


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> Indexed:
    """The fixture folder indexed once for every query test (HEIC left out: it exists only with the heif extra)."""
    home = tmp_path_factory.mktemp("query_home")
    photos = (home / "photos").resolve()
    layout = make_photo_folder(photos)
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--exclude", "*.heic", "--no-progress"], env).ok()
    searchable = sorted(p for p in layout["good"] if not p.endswith(".heic"))
    return Indexed(photos, home / "index", tiny_bundle, env, searchable)


def query_json(indexed: Indexed, *args) -> dict:
    return json.loads(invoke_uclip(["query", *map(str, args), "--format", "json"], indexed.env).ok().stdout)


def result_paths(output: dict) -> list[str]:
    return [r["path"] for r in output["results"]]


# ---------------------------------------------------------------------------- golden JSON

# The tiny bundle's weights are seeded and its tokenizers' vocabularies are stored in tests/data/tokenizers,
# so text and image scores are the same in every session. The bundle has no heads: text queries are English.
GOLDEN_QUERIES = {
    "text_english": ["a red boat on a lake"],
    "text_unicode": ["mačka na kauču"],
    "image_beach": ["{photos}/beach.jpg"],
    "image_unicode_name": ["{photos}/albums/2024/mačka na kauču.jpg"],
    "image_in_albums": ["{photos}/portrait.jpeg", "--in", "{photos}/albums"],
}


def exact_scores(indexed: Indexed, checkpoints, output: dict) -> tuple[list[float], float]:
    """The exact (float64) score of each result of a query's JSON output, and their float32 rounding bound.

    The bundle has no heads: a text query is CLIP's text tower on the bundle tokenizer's ids; an image
    query and every result are the image encoder on the pixels uclip decodes. Each vector is normalised
    twice, as the graph and then the runtime do; the score is one dot product.
    """
    import torch

    from rounding import exact_inputs
    from uclip_cli import bundle as B
    from uclip_cli.export.rounding import float32_error_bound
    from uclip_cli.text import TextTokenizer

    image = exact_tower(checkpoints, B.IMAGE_ENCODER)
    results = torch.cat([exact_inputs(pixels_of(Path(r["path"]), indexed.bundle))[0] for r in output["results"]])
    if output["kind"] == "image":
        query_inputs = exact_inputs(pixels_of(Path(output["query"]), indexed.bundle))
        query = image
    else:
        settings = B.load_bundle(indexed.bundle, verify=False).tokenizers["clip"]
        feeds = TextTokenizer(indexed.bundle / settings.file, settings)([output["query"]])
        query_inputs = exact_inputs(feeds["input_ids"], feeds["attention_mask"])
        query = exact_tower(checkpoints, B.TEXT_CLIP)

    def scores(*inputs):
        q = normalised(normalised(query(*inputs[:-1])))
        return q @ normalised(normalised(image(inputs[-1]))).T

    bounded = float32_error_bound(scores, [*query_inputs, results], row_wise=False)
    assert not bounded.unmodelled
    return bounded.result[0].tolist(), float(bounded.bound.max())


def portable(output: dict, photos: Path, exact: list[float]) -> dict:
    """Query output with paths relative to the fixture folder and the exact scores."""
    query = output["query"]
    if output["kind"] == "image":
        query = relative_to(photos, [query])[0]
    return {"query": query, "kind": output["kind"], "space": output["space"],
            "results": [{"path": path, "score": round(score, GOLDEN_DECIMALS)}
                        for path, score in zip(relative_to(photos, result_paths(output)), exact)]}


def assert_matches_golden(actual: dict, golden: dict, bound: float) -> None:
    """Same query, same set of results; each float32 score within `bound` (+ printed decimals) of the
    golden exact score; best first, where a near-tie may swap within both scores' bounds."""
    assert {k: actual[k] for k in ("query", "kind", "space")} == {k: golden[k] for k in ("query", "kind", "space")}
    want = {r["path"]: r["score"] for r in golden["results"]}
    got = {r["path"]: r["score"] for r in actual["results"]}
    assert got.keys() == want.keys()
    allowed = bound + 0.5 * 10.0 ** -JSON_DECIMALS + 0.5 * 10.0 ** -GOLDEN_DECIMALS
    for path, score in got.items():
        assert abs(score - want[path]) <= allowed, (path, score, want[path], allowed)
    ranked = [want[r["path"]] for r in actual["results"]]
    assert all(a >= b - 2 * allowed for a, b in zip(ranked, ranked[1:])), ranked


@pytest.mark.parametrize("name", sorted(GOLDEN_QUERIES))
def test_json_output_matches_golden(indexed, tiny_checkpoints, name):
    args = [a.format(photos=indexed.photos) for a in GOLDEN_QUERIES[name]]
    output = query_json(indexed, *args, *ALL)
    golden_file = GOLDEN_DIR / f"query_{name}.json"
    exact, bound = exact_scores(indexed, tiny_checkpoints, output)
    relative = portable(output, indexed.photos, [r["score"] for r in output["results"]])
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        text = json.dumps(portable(output, indexed.photos, exact), indent=2, ensure_ascii=False)
        golden_file.write_text(text + "\n", encoding="utf-8")
    assert golden_file.is_file(), f"{golden_file} is missing: run the tests once with UCLIP_UPDATE_GOLDEN=1"
    assert_matches_golden(relative, json.loads(golden_file.read_text(encoding="utf-8")), bound)


def test_output_is_deterministic_run_to_run(indexed):
    args = ["query", "a red boat on a lake", "--format", "json", *ALL]
    first, second = run_uclip(args, indexed.env).ok(), run_uclip(args, indexed.env).ok()
    assert first.stdout == second.stdout == invoke_uclip(args, indexed.env).ok().stdout
    assert len(json.loads(first.stdout)["results"]) == len(indexed.searchable)


# ---------------------------------------------------------------------------- options and formats


def test_top_returns_the_best_k(indexed):
    everything = result_paths(query_json(indexed, "children playing football", *ALL))
    assert sorted(relative_to(indexed.photos, everything)) == indexed.searchable
    assert result_paths(query_json(indexed, "children playing football", "--top", "3")) == everything[:3]
    assert len(result_paths(query_json(indexed, "children playing football"))) == 10  # the default


def test_min_score_drops_lower_scores(indexed):
    results = query_json(indexed, "a bowl of fruit", *ALL)["results"]
    scores = [r["score"] for r in results]
    gaps = [(scores[i] - scores[i + 1], i) for i in range(2, len(scores) - 2)]
    _, cut = max(gaps)
    threshold = (scores[cut] + scores[cut + 1]) / 2
    kept = query_json(indexed, "a bowl of fruit", *ALL, "--min-score", f"{threshold:.7f}")["results"]
    assert kept == results[:cut + 1]

    above_all = f"{scores[0] + 0.01:.6f}"
    assert query_json(indexed, "a bowl of fruit", "--min-score", above_all)["results"] == []
    table = invoke_uclip(["query", "a bowl of fruit", "--min-score", above_all], indexed.env).ok()
    assert table.stdout.strip() == "no results"
    paths = invoke_uclip(["query", "a bowl of fruit", "--min-score", above_all, "--format", "paths"], indexed.env).ok()
    assert paths.stdout == ""   # nothing for xargs to run on


def test_table_paths_and_json_agree(indexed):
    results = query_json(indexed, "a white boat", "--top", "5")["results"]
    paths = invoke_uclip(["query", "a white boat", "--top", "5", "--format", "paths"], indexed.env).ok().stdout
    assert paths.splitlines() == [r["path"] for r in results]

    table = invoke_uclip(["query", "a white boat", "--top", "5", "--format", "table"], indexed.env).ok().stdout
    header, *rows = table.splitlines()
    assert header.split() == ["score", "path"]
    parsed = [line.strip().split(None, 1) for line in rows]
    assert [path for _, path in parsed] == [r["path"] for r in results]
    # the same scores (one machine, one computation), printed with 3 and with 6 decimals
    printed = 0.5e-3 + 0.5 * 10.0 ** -JSON_DECIMALS
    assert [float(score) for score, _ in parsed] == pytest.approx([r["score"] for r in results], abs=printed)


def test_untrained_bundle_says_other_languages_need_training(indexed):
    text = invoke_uclip(["query", "a cat"], indexed.env).ok()
    assert "uclip train" in text.stderr
    image = invoke_uclip(["query", indexed.photos / "beach.jpg"], indexed.env).ok()
    assert "uclip train" not in image.stderr


def test_text_flag_treats_an_image_path_as_text(indexed):
    path = str(indexed.photos / "beach.jpg")
    output = query_json(indexed, path, "--text", *ALL)
    assert output["kind"] == "text" and path in result_paths(output)


# ---------------------------------------------------------------------------- image as query


def test_image_query_excludes_the_image_itself(indexed):
    output = json.loads(run_uclip(["query", indexed.photos / "beach.jpg", "--format", "json", *ALL], indexed.env).ok().stdout)
    assert output["kind"] == "image"
    assert sorted(relative_to(indexed.photos, result_paths(output))) == [p for p in indexed.searchable if p != "beach.jpg"]


def test_image_outside_the_index_as_query(indexed, tmp_path):
    outsider = tmp_path / "outsider.jpg"
    outsider.write_bytes(jpeg_bytes(photo_like(200, 150, seed=321)))
    output = query_json(indexed, outsider, *ALL)
    assert output["kind"] == "image"
    assert sorted(relative_to(indexed.photos, result_paths(output))) == indexed.searchable


def test_unicode_names_are_printed_and_searchable(indexed):
    env = {**indexed.env, "LC_ALL": "C"}     # the least helpful locale a user can have
    listed = run_uclip(["query", "a cat on a sofa", "--format", "paths", *ALL], env).ok().stdout.splitlines()
    for name in ("albums/2024/mačka na kauču.jpg", "日本/写真.png"):
        assert str(indexed.photos / name) in listed

    japanese = indexed.photos / "日本"
    assert query_json(indexed, "a photo", "--in", japanese, *ALL)["results"][0]["path"] == str(japanese / "写真.png")
    assert len(query_json(indexed, "a photo", "--in", japanese, *ALL)["results"]) == 1

    by_example = query_json(indexed, indexed.photos / "albums/2024/mačka na kauču.jpg", *ALL)
    assert len(by_example["results"]) == len(indexed.searchable) - 1
    assert str(indexed.photos / "albums/2024/mačka na kauču.jpg") not in result_paths(by_example)


def test_installed_uclip_command(indexed):
    """The console script a user types, with the bundle and index taken from $UCLIP_BUNDLE / $UCLIP_INDEX."""
    listed = run_uclip(["query", "a cat", "--top", "2", "--format", "paths"], indexed.env, entry_point=True).ok()
    assert len(listed.stdout.splitlines()) == 2
    assert run_uclip(["query", ""], indexed.env, entry_point=True).one_line_error()


# ---------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_query(indexed, text):
    message = run_uclip(["query", text], indexed.env).one_line_error()
    assert "empty" in message


def test_missing_index(indexed, tmp_path):
    nowhere = tmp_path / "no index here"
    message = run_uclip(["query", "a cat", "--index", nowhere], indexed.env).one_line_error()
    assert str(nowhere) in message and "uclip index" in message


def test_missing_bundle(indexed, tmp_path):
    nowhere = tmp_path / "no bundle here"
    message = run_uclip(["query", "a cat", "--bundle", nowhere], indexed.env).one_line_error()
    assert str(nowhere) in message and "uclip pull" in message and "--bundle" in message


def text_tower_file(bundle: Path) -> str:
    from uclip_cli import bundle as B

    return B.TEXT_MULTILINGUAL if B.load_bundle(bundle, verify=False).has_heads else B.TEXT_CLIP


def test_tampered_bundle_is_refused_naming_the_file(indexed, tmp_path):
    from uclip_cli import bundle as B

    text_tampered = copy_bundle(indexed.bundle, tmp_path / "text_tampered")
    flip_one_byte(text_tampered / text_tower_file(text_tampered))
    message = run_uclip(["query", "a cat", "--bundle", text_tampered], indexed.env).one_line_error()
    assert str(text_tampered / text_tower_file(text_tampered)) in message

    image_tampered = copy_bundle(indexed.bundle, tmp_path / "image_tampered")
    flip_one_byte(image_tampered / B.IMAGE_ENCODER)
    for args in (["query", indexed.photos / "beach.jpg"], ["index", indexed.photos, "--index", tmp_path / "new_index"]):
        message = run_uclip([*args, "--bundle", image_tampered], indexed.env).one_line_error()
        assert str(image_tampered / B.IMAGE_ENCODER) in message


def test_index_built_with_another_bundle_is_refused(indexed, tmp_path):
    other = bundle_with_other_image_encoder(indexed.bundle, tmp_path / "other_bundle")
    for args in (["query", "a cat"], ["query", indexed.photos / "beach.jpg"], ["index", indexed.photos]):
        message = run_uclip([*args, "--bundle", other], indexed.env).one_line_error()
        assert "built with" in message and str(other) in message, message
    # the refused index is untouched: the right bundle still searches all of it
    assert len(query_json(indexed, "a cat", *ALL)["results"]) == len(indexed.searchable)


# ---------------------------------------------------------------------------- doctor


def test_doctor_on_a_good_bundle(indexed):
    result = run_uclip(["doctor", "--json"], indexed.env)
    assert result.code == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["provider CPUExecutionProvider"]["ok"] and checks["provider CPUExecutionProvider"]["detail"] == "ok"
    assert checks["bundle checksums"]["ok"] and "ok" in checks["bundle checksums"]["detail"]
    assert all(c["ok"] for c in checks.values())


def test_doctor_refuses_another_valid_graph_in_a_files_place_as_query_does(indexed, tmp_path):
    """Issue 19 item 8: text_clip.onnx replaced by another valid graph, the manifest re-hashed: the checksums
    agree, and doctor passed it while `uclip query` refused it; doctor now opens it with the same signature check."""
    from uclip_cli import bundle as B

    swapped = copy_bundle(indexed.bundle, tmp_path / "swapped")
    shutil.copyfile(swapped / B.IMAGE_ENCODER, swapped / B.TEXT_CLIP)
    B.update_manifest(swapped)
    result = run_uclip(["doctor", "--json", "--bundle", swapped], indexed.env)
    assert result.code == 1, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["bundle checksums"]["ok"]
    bad = [c for c in checks.values() if not c["ok"]]
    assert [c["name"] for c in bad] == [f"session {B.TEXT_CLIP}"]
    assert str(swapped / B.TEXT_CLIP) in bad[0]["detail"]
    query = run_uclip(["query", "a cat", "--bundle", swapped], indexed.env).one_line_error()
    assert B.TEXT_CLIP in query                               # the same refusal query gives


def test_doctor_on_a_tampered_bundle(indexed, tmp_path):
    from uclip_cli import bundle as B

    tampered = copy_bundle(indexed.bundle, tmp_path / "tampered")
    flip_one_byte(tampered / B.IMAGE_ENCODER)
    result = run_uclip(["doctor", "--bundle", tampered], indexed.env)
    assert result.code == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "checksums" in bad[0] and B.IMAGE_ENCODER in bad[0]
    assert "Traceback" not in result.stderr

"""Training text from files and Hugging Face datasets (issue 8 item 2): specs, languages, the local cache,
and `uclip train` against a local stand-in for the hub (HF_ENDPOINT), online, offline and failing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import ERROR_PREFIX, copy_bundle, invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli.train.data import TrainInputError
from uclip_cli.train.recipes import CHECKED, load_recipes
from uclip_cli.train.sources import HubTextCache, _texts_in, parse_hub_spec, parse_text_source, read_text_source

TESTS = Path(__file__).resolve().parent


def test_hub_specs_name_repo_config_revision_split_and_column():
    spec = parse_hub_spec("hf://datasets/Helsinki-NLP/opus-100@abc123/cs-en:train:translation.cs")
    assert (spec.repo, spec.revision, spec.config, spec.split, spec.column) == (
        "Helsinki-NLP/opus-100", "abc123", "cs-en", "train", "translation.cs")
    assert spec.text == "hf://datasets/Helsinki-NLP/opus-100@abc123/cs-en:train:translation.cs"
    plain = parse_hub_spec("hf://datasets/yerevann/coco-karpathy:train:sentences")
    assert (plain.repo, plain.config, plain.revision) == ("yerevann/coco-karpathy", None, None)
    for bad in ("hf://datasets/yerevann/coco-karpathy:train", "hf://datasets/a/b/c/d:train:x", "hf://datasets/a@:t:x"):
        with pytest.raises(TrainInputError, match="hf://datasets/NAME"):
            parse_hub_spec(bad)


def test_text_sources_carry_their_language(tmp_path):
    (tmp_path / "fi.txt").write_text("hei\n", encoding="utf-8")
    assert parse_text_source(f"cs={tmp_path / 'x.txt'}").language == "cs"
    assert parse_text_source(tmp_path / "fi.txt").language == "fi"            # a file named like a code
    assert parse_text_source(tmp_path / "sentences.txt").language is None
    source = parse_text_source("hu=hf://datasets/Helsinki-NLP/opus-100/en-hu:train:translation.hu")
    assert source.language == "hu" and source.hub.config == "en-hu"
    with pytest.raises(TrainInputError, match="only datasets"):
        parse_text_source("hf://models/x/y")


def test_column_paths_reach_into_records_and_lists():
    assert list(_texts_in([" a\nb ", "c"], [], "s")) == ["a b", "c"]
    assert list(_texts_in({"cs": "věta", "en": "x"}, ["cs"], "s")) == ["věta"]
    assert list(_texts_in([{"raw": "one"}, {"raw": "two"}], ["raw"], "s")) == ["one", "two"]
    with pytest.raises(TrainInputError, match="name one as COLUMN.FIELD"):
        list(_texts_in({"cs": "x"}, [], "s"))
    with pytest.raises(TrainInputError, match="no field 'de' \\(fields: cs, en\\)"):
        list(_texts_in({"cs": "x", "en": "y"}, ["de"], "s"))


def test_cached_texts_are_read_without_the_network(tmp_path, monkeypatch):
    import uclip_cli.train.sources as sources_module

    spec = parse_hub_spec("hf://datasets/owner/caps:train:text")
    cache = HubTextCache(tmp_path)
    cache._write(spec, ["one", "two", "three"], "f" * 40, complete=False)
    monkeypatch.setattr(sources_module, "stream_hub_texts", lambda *a, **k: pytest.fail("the network was used"))
    messages = []
    texts = read_text_source(parse_text_source(spec.text), max_rows=2, cache_root=tmp_path, log=messages.append)
    assert texts == ["one", "two"] and "from the local cache (commit ffffffffffff" in messages[0]
    monkeypatch.setattr(sources_module, "stream_hub_texts", lambda *a, **k: (["more"], "e" * 40, True))
    assert read_text_source(parse_text_source(spec.text), max_rows=5, cache_root=tmp_path) == ["more"]  # more than cached


def test_shipped_recipes_are_well_formed():
    recipes = load_recipes()
    assert {"cs-fi-hr-hu-ro", "cs-opus", "fi-opus", "hr-opus", "hu-opus", "ro-opus", "xm3600", "cs", "ja"} <= set(recipes)
    assert recipes["cs-fi-hr-hu-ro"].languages == ["cs", "fi", "hr", "hu", "ro"]
    for recipe in recipes.values():
        assert recipe.checked in CHECKED and recipe.captions and recipe.foreign
        sources = (*recipe.captions, *recipe.foreign)
        if recipe.checked == "shipped":
            assert all(s.shipped and s.hub is None and s.path is None for s in sources)
        else:
            assert all(s.hub is not None and s.max_rows for s in sources)
        assert all(s.language for s in recipe.foreign)
    assert len(recipes["xm3600"].languages) == 35 and "en" not in recipes["xm3600"].languages


def test_a_language_recipe_reads_the_captions_shipped_with_uclip_without_network():
    from uclip_cli.captions import shipped_captions

    recipe = load_recipes()["fi"]
    assert recipe.languages == ["fi"]
    english = read_text_source(recipe.captions[0])
    finnish = read_text_source(recipe.foreign[0], max_rows=100)
    assert len(english) == 1800 and english == shipped_captions("en")
    assert len(finnish) == 100 and finnish == shipped_captions("fi")[:100]
    with pytest.raises(TrainInputError, match="uclip ships XM3600 captions in ar, bn, cs"):
        parse_text_source("uclip:xm3600:tlh")


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, tiny_bundle):
    """Every hub scenario of hub_train_driver.py, run once in its own process."""
    home = tmp_path_factory.mktemp("hub_home")
    bundle = copy_bundle(tiny_bundle, home / "bundle")
    photos = home / "photos"
    photos.mkdir()
    for i in range(30):
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(64 + i, 60, seed=200 + i)))
    env = uclip_env(home, bundle=bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    env.update(HF_HOME=str(home / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, str(TESTS / "hub_train_driver.py"), str(home), str(bundle), str(home / "index")],
                          env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    runs = json.loads(done.stdout.decode().strip().splitlines()[-1])
    print({k: round(v["seconds"], 1) for k, v in runs.items() if isinstance(v, dict)})
    return runs


def _one_line_error(result: dict) -> str:
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == 2 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result
    return lines[0][len(ERROR_PREFIX):]


def test_a_recipe_trains_from_hub_datasets_streamed_once(hub_runs):
    run = hub_runs["recipe"]
    assert run["code"] == 0, run
    assert "hf://datasets/yerevann/coco-karpathy:train:sentences: streaming from http://127.0.0.1:" in run["stderr"]
    assert "English captions: 90 from hf://datasets/yerevann/coco-karpathy:train:sentences (90)" in run["stderr"]
    assert "foreign memory: 20 rows: cs 20" in run["stderr"]
    assert "image memory: 30 frozen image features from the index" in run["stderr"]
    # only the text column of the parquet files is read; the endpoints are those the hub serves
    assert not [r for r in hub_runs["unexpected"] if "agent-harnesses" not in r], hub_runs["unexpected"]
    assert any(r.startswith("GET /api/datasets/yerevann/coco-karpathy") for r in hub_runs["requests"])
    spec = hub_runs["captions_spec"]
    assert spec["code"] == 0, spec
    assert "English captions: 40 from hf://datasets/yerevann/coco-karpathy:test:sentences (40)" in spec["stderr"]
    assert "foreign memory: 20 rows: fi 20" in spec["stderr"]


def test_a_second_run_needs_no_network(hub_runs):
    run = hub_runs["offline_recipe"]
    assert run["code"] == 0, run
    assert "hf://datasets/yerevann/coco-karpathy:train:sentences: 90 texts from the local cache" in run["stderr"]
    assert "no network used" in run["stderr"] and "streaming" not in run["stderr"]


@pytest.mark.parametrize("scenario, expected", [
    ("unknown_dataset", "hf://datasets/nobody/nothing:train:text: no dataset 'nobody/nothing' on the Hugging Face hub at http://127.0.0.1:"),
    ("missing_column", "hf://datasets/yerevann/coco-karpathy:train:caption: no column 'caption' (columns: filepath, filename, sentences, cocoid)"),
    ("unknown_split", "hf://datasets/yerevann/coco-karpathy:val:sentences: Bad split: val. Available splits: ['train', 'test']"),
    ("offline_uncached", "hf://datasets/Helsinki-NLP/opus-100/en-hu:train:translation.hu: cannot reach the Hugging Face hub at http://127.0.0.1:"),
])
def test_hub_failures_are_one_line(hub_runs, scenario, expected):
    message = _one_line_error(hub_runs[scenario])
    assert message.startswith(expected), message
    if scenario == "offline_uncached":
        assert "and there is no cached copy: connect once to fetch it, or train from text at hand: a local file of " \
               "sentences, one per line" in message and "--recipe xm3600" in message

"""Query terms (uclip_cli.terms): the grammar shared by `uclip query` and `uclip serve`, and what
combined queries return end to end (checked against float64 references built from single-term results)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import index_records, index_vectors, invoke_uclip, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from rounding import U32, assert_within, gamma
from uclip_cli.terms import ID, IMAGE, MAX_QUERY_CHARS, MAX_TERMS, TEXT, QueryTermsError, combine, parse_terms


def read(query: str, **options) -> list[tuple[float, str, str]]:
    return [(t.weight, t.kind, t.value) for t in parse_terms(query, **options).terms]


HEX = "0123456789abcdef" * 2


# ---------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("query, terms", [
    ("mačka na kauču", [(1, TEXT, "mačka na kauču")]),
    ('"beach" - "people"', [(1, TEXT, "beach"), (-1, TEXT, "people")]),
    ("beach - people", [(1, TEXT, "beach"), (-1, TEXT, "people")]),
    ('"beach"-"people"', [(1, TEXT, "beach-people")]),          # no space: one word, the dash is text
    ('2:"sunset" + ./photo.jpg', [(2, TEXT, "sunset"), (1, IMAGE, "./photo.jpg")]),
    ("./racing.jpg - 2:sports car + .5:snow", [(1, IMAGE, "./racing.jpg"), (-2, TEXT, "sports car"), (0.5, TEXT, "snow")]),
    ('"Prague - old town"', [(1, TEXT, "Prague - old town")]),
    ("10:30 meeting", [(1, TEXT, "10:30 meeting")]),            # one term alone carries no weight
    ('"10:30 meeting" + 2:office', [(1, TEXT, "10:30 meeting"), (2, TEXT, "office")]),
    ("AC/DC concert", [(1, TEXT, "AC/DC concert")]),
    ("St. Vitus", [(1, TEXT, "St. Vitus")]),
    ("rock-n-roll  -  jazz", [(1, TEXT, "rock-n-roll"), (-1, TEXT, "jazz")]),
    ('the "best"  pizza', [(1, TEXT, "the best pizza")]),
    (r'"say \"cheese\" \\ smile"', [(1, TEXT, 'say "cheese" \\ smile')]),
    (f"id:{HEX} + night", [(1, ID, HEX), (1, TEXT, "night")]),
    (f"id:{HEX.upper()}", [(1, ID, HEX)]),
    ("- people + beach", [(-1, TEXT, "people"), (1, TEXT, "beach")]),
    ("photo.JPG", [(1, IMAGE, "photo.JPG")]),
    ('"my photos/beach 1.jpg" - sea', [(1, IMAGE, "my photos/beach 1.jpg"), (-1, TEXT, "sea")]),
    ("~/Pictures/a.png", [(1, IMAGE, "~/Pictures/a.png")]),
    ("كلب على الشاطئ", [(1, TEXT, "كلب على الشاطئ")]),
])
def test_grammar(query, terms):
    assert read(query) == [(float(w), k, v) for w, k, v in terms]


def test_force_text_reads_the_whole_string_as_one_text_term():
    assert read('./beach.jpg - 2:"people"', force_text=True) == [(1.0, TEXT, './beach.jpg - 2:"people"')]


def test_terms_print_back_as_a_query_that_reads_the_same():
    for query in ['2:"sunset" + ./photo.jpg - people', f'id:{HEX} - "a \\"quoted\\" word"', "- a + 0.25:b c"]:
        terms = parse_terms(query)
        assert parse_terms(str(terms)) == terms, str(terms)


@pytest.mark.parametrize("query, says", [
    ("", "empty"),
    ("   ", "empty"),
    ("a - - b", "column 3 is followed by '-' at column 5"),
    ("a +", "ends with '+'"),
    ('"beach', "column 1 is never closed"),
    ("- people", "only subtracts"),
    ("a + 0:b", "weight 0"),
    ("a + 5000:b", "at most 1000"),
    ("id:12ab", "32 hex digits"),
    ('a + ""', "empty"),
    ("a\x00b", "NUL"),
    ("x" * (MAX_QUERY_CHARS + 1), "characters long"),
    (" + ".join(["a"] * (MAX_TERMS + 1)), f"at most {MAX_TERMS}"),
])
def test_bad_queries_say_what_is_wrong(query, says):
    with pytest.raises(QueryTermsError, match=None) as caught:
        parse_terms(query)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_paths_are_refused_where_photos_are_named_by_id():
    for query in ["./beach.jpg", "/etc/passwd.png", "a + ../x.jpg", "~/p.webp"]:
        with pytest.raises(QueryTermsError, match="by id"):
            parse_terms(query, allow_paths=False)
    assert read("AC/DC - 2:St. Vitus", allow_paths=False) == [(1.0, TEXT, "AC/DC"), (-2.0, TEXT, "St. Vitus")]


# ---------------------------------------------------------------------------- combine

def test_combine_is_the_normalised_weighted_sum():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = [2.0, -1.0, 0.5]
    got = combine(vectors, weights)
    exact = (np.asarray(weights)[:, None] * vectors.astype(np.float64)).sum(axis=0)
    exact /= np.linalg.norm(exact)
    assert got.dtype == np.float32
    assert_within(got, exact, 4 * gamma(3) + U32, "combined vector")     # float64 sum, one rounding to float32
    assert combine(vectors[:1], [1.0]) is not None and np.array_equal(combine(vectors[:1], [1.0]), vectors[0])
    with pytest.raises(QueryTermsError, match="cancel"):
        combine(np.stack([vectors[0], vectors[0]]), [1.0, -1.0])


# ---------------------------------------------------------------------------- `uclip query` with terms

@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle):
    home = tmp_path_factory.mktemp("terms_home")
    photos = (home / "photos").resolve()
    for i, name in enumerate(["beach.jpg", "boat.jpg", "city.jpg", "forest.jpg", "cat on sofa.jpg", "dog.jpg"]):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(jpeg_bytes(photo_like(160, 120, seed=100 + i)))
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    return photos, home / "index", env


def run(env, *args) -> dict:
    return json.loads(invoke_uclip(["query", *map(str, args), "--format", "json", "--top", "100"], env).ok().stdout)


def test_combined_ids_score_against_the_normalised_weighted_sum(indexed):
    photos, index, env = indexed
    records = index_records(index)
    vectors = index_vectors(index)
    a, b, c = (str(photos / n) for n in ("beach.jpg", "boat.jpg", "city.jpg"))
    out = run(env, f"id:{records[a].content_hash} + 2:id:{records[b].content_hash} - 0.5:{c}")
    assert out["kind"] == "combined" and [t["kind"] for t in out["terms"]] == [ID, ID, IMAGE]
    query = vectors[a].astype(np.float64) + 2 * vectors[b] - 0.5 * vectors[c]
    query /= np.linalg.norm(query)
    got = {r["path"]: r["score"] for r in out["results"]}
    assert set(got) == set(vectors) - {a, b, c}          # the example photos themselves are left out
    for path, score in got.items():
        reference = float(vectors[path].astype(np.float64) @ query)
        # float32 query (one rounding), canonical float32 score (one more), 6 decimals in JSON
        assert_within(score, reference, 2 * U32 + gamma(len(query)) + 5e-7, path)
    assert [r["id"] for r in out["results"]] == [records[r["path"]].content_hash for r in out["results"]]


def test_text_terms_combine_linearly(indexed):
    """score(2:"T" + B) = (2 score(T) + score(B)) / |2t + b|, with |2t + b|^2 = 5 + 4 score_T(B)."""
    from uclip_cli.query import run_query
    from uclip_cli.sessions import SessionFactory

    photos, index, env = indexed
    vectors = index_vectors(index)
    beach = str(photos / "beach.jpg")
    args = dict(index_path=index, bundle_path=Path(env["UCLIP_BUNDLE"]), sessions=SessionFactory(device="cpu"), top=100)
    text = {h.path: h.score for h in run_query("a red boat", **args).hits}
    both = {h.path: h.score for h in run_query(f'2:"a red boat" + {beach}', **args).hits}
    assert set(both) == set(vectors) - {beach}
    norm = np.sqrt(5 + 4 * np.float64(text[beach]))
    d = len(vectors[beach])
    for path, score in both.items():
        image_score = float(vectors[path].astype(np.float64) @ vectors[beach].astype(np.float64))
        reference = (2 * np.float64(text[path]) + image_score) / norm
        # the text vector's norm is 1 within gamma(d); each score carries one float32 rounding
        assert_within(score, reference, 8 * gamma(d) + 4 * U32, path)


def test_terms_that_cancel_or_name_nothing_are_one_line_errors(indexed, tmp_path):
    photos, _, env = indexed
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        '"beach" - "beach"': "cancel",
        f"{tmp_path}/missing.jpg": "no such file",
        f"a + {tmp_path}/folder.jpg": "is a folder",
        f"id:{'f' * 32}": "no photo with id",
        '"unclosed': "never closed",
    }
    for query, says in cases.items():
        message = run_uclip(["query", query], env).one_line_error()
        assert says in message, message


def test_a_path_with_spaces_as_the_whole_query_is_that_image(indexed):
    photos, _, env = indexed
    out = run(env, photos / "cat on sofa.jpg")
    assert out["kind"] == "image" and str(photos / "cat on sofa.jpg") not in [r["path"] for r in out["results"]]

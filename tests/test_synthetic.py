from dataclasses import fields

import numpy as np
import pytest

from rounding import U32, assert_within
from uclip_cli.train.synthetic import (
    FULL,
    ORACLE,
    UNTRAINED,
    SyntheticData,
    WorldConfigError,
    evaluate_heads,
    generate_world,
    pseudo_pair_quality,
    small_world,
    synthetic_train_config,
    train_variant,
)


def _arrays(data: SyntheticData) -> dict[str, np.ndarray]:
    out = {}
    for f in fields(data):
        value = getattr(data, f.name)
        if isinstance(value, np.ndarray):
            out[f.name] = value
        elif isinstance(value, dict):
            out.update({f"{f.name}[{k}]": v for k, v in value.items()})
    return out


def test_generator_is_deterministic_under_its_seed():
    a, b = _arrays(generate_world(small_world(seed=3))), _arrays(generate_world(small_world(seed=3)))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    other = generate_world(small_world(seed=4))
    assert not np.array_equal(a["anchor_clip"], other.anchor_clip)


def test_shapes_and_normalisation():
    c = small_world()
    data = generate_world(c)
    n_lang = len(c.languages)
    assert data.anchor_clip.shape == (c.n_anchors, c.d_v) and data.anchor_multi.shape == (c.n_anchors, c.d_m)
    assert data.image_memory.shape == (c.n_image_memory, c.d_v)
    assert data.foreign_memory.shape == (c.n_foreign_memory * n_lang, c.d_m)
    assert sorted(data.test_captions) == sorted(("en", *c.languages))
    assert data.oracle_images.shape == (c.n_anchors * n_lang, c.d_v) == data.oracle_captions.shape[:1] + (c.d_v,)
    for name, x in _arrays(data).items():
        if x.ndim == 2 and name != "meaning_latents":   # every feature row is L2-normalised
            # normalised in float64, then each element rounded to float32 (relative error <= u/2)
            assert_within(np.linalg.norm(x.astype(np.float64), axis=1), 1.0, U32, what=name)


def test_default_training_data_is_unpaired():
    data = generate_world(small_world())
    anchors, images, foreign, test = (set(data.anchor_meanings), set(data.image_memory_meanings),
                                      set(data.foreign_memory_meanings), set(data.test_meanings))
    assert len(anchors) == data.config.n_anchors
    assert not anchors & images and not anchors & foreign and not images & foreign
    assert not test & (anchors | images | foreign)
    # every language's memory describes the same (translated) meanings
    for lang in data.config.languages:
        assert set(data.foreign_memory_meanings[data.foreign_memory_languages == lang]) == foreign


def test_memory_overlap_draws_that_share_from_the_anchors():
    c = small_world(memory_overlap=0.25)
    data = generate_world(c)
    anchors = set(data.anchor_meanings)
    assert len(set(data.image_memory_meanings) & anchors) == round(0.25 * c.n_image_memory)
    assert len(set(data.foreign_memory_meanings) & anchors) == round(0.25 * c.n_foreign_memory)
    assert not set(data.test_meanings) & (anchors | set(data.image_memory_meanings) | set(data.foreign_memory_meanings))


def test_translated_memory_holds_the_anchor_captions_translations():
    # memories of other meanings: soft retrieval never lands on the anchor's own meaning
    assert pseudo_pair_quality(generate_world(small_world()))["foreign_hit"] == 0.0
    # a translated copy of the anchor captions: each English anchor finds its own translation
    c = small_world(memory_overlap=1.0, translated_memory=True, n_foreign_memory=1024)
    assert pseudo_pair_quality(generate_world(c))["foreign_hit"] > 0.9


@pytest.mark.parametrize("overrides", [{"languages": ("cs", "en")}, {"memory_overlap": 1.5}, {"item_detail": -1.0}])
def test_bad_world_settings_are_rejected(overrides):
    with pytest.raises(WorldConfigError, match="world setting"):
        generate_world(small_world(**overrides))


@pytest.fixture(scope="module")
def trained_scores():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: on a busy machine more threads only wait for each other
    try:
        data = generate_world(small_world(seed=0))
        config = synthetic_train_config(seed=0)
        return {v: evaluate_heads(train_variant(data, v, config), data)["average"]["t2i"] for v in (UNTRAINED, FULL, ORACLE)}
    finally:
        torch.set_num_threads(threads)


def test_full_method_far_above_untrained_heads(trained_scores):
    untrained, full = trained_scores[UNTRAINED], trained_scores[FULL]
    assert full["R@10"] >= untrained["R@10"] + 50, trained_scores


def test_oracle_at_least_as_good_as_full_method(trained_scores):
    assert trained_scores[ORACLE]["R@10"] >= trained_scores[FULL]["R@10"] - 3, trained_scores

"""Head_B adapted to the image memory after its closed-form fit (train/adapt.py, issue 20 item 3): the affine
map folded into the head, the moments it matches, CSLS mutual pairs, the self-learning refit, and the settings."""
import numpy as np
import pytest
import torch

from uclip_cli.train.adapt import _run, csls_mutual_pairs, fold_affine, moment_map
from uclip_cli.train.config import TrainConfig, TrainConfigError
from uclip_cli.train.data import TrainInputs
from uclip_cli.train.heads import KernelHead, ProjectionHead, export_heads_onnx
from uclip_cli.train.trainer import train_heads
from conftest import unit_rows as unit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def world(rng, n=1200, d_clip=24, d_multi=16, shift=0.8):
    """Anchors (e_I, e_K = a curved map of e_I), and memories from a shifted domain: photos and foreign text whose
    content is drawn around another centre (disjoint samples, no pairing)."""
    w = rng.standard_normal((d_clip, d_multi))
    centre = rng.standard_normal(d_clip) * shift / np.sqrt(d_clip) * 4
    mapping = lambda x: np.tanh(x @ w)                                    # noqa: E731
    e_I = unit(rng.standard_normal((n, d_clip)))
    e_K = unit(mapping(e_I) + 0.05 * rng.standard_normal((n, d_multi)))
    photos = unit(rng.standard_normal((300, d_clip)) + centre)
    foreign = unit(mapping(unit(rng.standard_normal((300, d_clip)) + centre)))
    return e_I, e_K, photos, foreign


@pytest.mark.parametrize("head", [KernelHead(6, 5, landmarks=4), ProjectionHead(6, 5, hidden_mult=2)])
def test_an_affine_map_is_folded_into_the_last_layer(head):
    rng = np.random.default_rng(0)
    for p in head.parameters():
        torch.nn.init.normal_(p)
    head.eval()
    x = unit(rng.standard_normal((7, 6)))
    a, c = rng.standard_normal((5, 5)), rng.standard_normal(5)
    before = _run(head, x, normalise=False)
    fold_affine(head, a, c)
    np.testing.assert_allclose(_run(head, x, normalise=False), before @ a + c, rtol=1e-5, atol=1e-5)


def test_the_moment_map_moves_mean_and_covariance_onto_the_target():
    rng = np.random.default_rng(1)
    source = rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5] + 3.0
    target = rng.standard_normal((4000, 3)) @ np.array([[1.0, 0.5, 0], [0, 1.0, 0], [0, 0, 0.3]]) - 1.0
    a, c = moment_map(source, target, covariance=False)
    np.testing.assert_allclose(a, np.eye(3))
    np.testing.assert_allclose((source @ a + c).mean(0), target.mean(0), atol=1e-9)
    a, c = moment_map(source, target, covariance=True)
    moved = source @ a + c
    np.testing.assert_allclose(moved.mean(0), target.mean(0), atol=1e-9)
    # shrunk covariances: the moved rows' covariance lies between the target's and its isotropic level
    assert np.linalg.norm(np.cov(moved.T) - np.cov(target.T)) < 0.6 * np.linalg.norm(np.cov(source.T) - np.cov(target.T))


def test_csls_mutual_pairs_find_a_permutation_and_are_mutual():
    rng = np.random.default_rng(2)
    right = unit(rng.standard_normal((50, 12)))
    order = rng.permutation(50)
    left = unit(right[order] + 0.05 * rng.standard_normal((50, 12)))
    i, j = csls_mutual_pairs(left, right, k=3)
    assert len(i) >= 45
    np.testing.assert_array_equal(j, order[i])
    extra = unit(rng.standard_normal((30, 12)))                             # rows with no counterpart
    i, j = csls_mutual_pairs(np.concatenate([left, extra]), right, k=3)
    assert len(set(j)) == len(j) and len(set(i)) == len(i)                 # one-to-one


@pytest.mark.parametrize("kind", ["mean", "coral", "coral-input", "self-learning"])
def test_adapted_heads_report_what_was_done_keep_head_a_and_export(kind, tmp_path):
    rng = np.random.default_rng(3)
    e_I, e_K, photos, foreign = world(rng)
    inputs = TrainInputs(e_I, e_K, photos, foreign)
    plain = train_heads(inputs, TrainConfig(device="cpu", batch_size=64))
    adapted = train_heads(inputs, TrainConfig(device="cpu", batch_size=64, adapt_head_b=kind))
    assert adapted.start["adapt_head_b"] == kind and adapted.start["adapt_rows"] == [300, 300]
    if kind == "self-learning":
        assert len(adapted.start["pseudo_pairs"]) == 2 and min(adapted.start["pseudo_pairs"]) > 0
    for name in ("head_a",):
        for p, q in zip(getattr(plain.heads, name).state_dict().values(), getattr(adapted.heads, name).state_dict().values()):
            torch.testing.assert_close(p, q)
    assert not np.allclose(_run(plain.heads.head_b, photos), _run(adapted.heads.head_b, photos))
    export_heads_onnx(adapted.heads, tmp_path)                              # same graph, parity checked


def test_mean_adaptation_moves_the_photos_outputs_onto_the_foreign_texts_mean():
    rng = np.random.default_rng(4)
    e_I, e_K, photos, foreign = world(rng)
    heads = train_heads(TrainInputs(e_I, e_K, photos, foreign),
                        TrainConfig(device="cpu", batch_size=64, adapt_head_b="mean")).heads
    np.testing.assert_allclose(_run(heads.head_b, photos, normalise=False).mean(0), _run(heads.head_a, foreign).mean(0),
                               atol=1e-5)


def test_the_default_does_not_adapt_and_bad_settings_are_named():
    assert TrainConfig().adapt_head_b is None
    with pytest.raises(TrainConfigError, match="adapt_head_b='whiten' must be one of mean, coral, coral-input, self-learning"):
        TrainConfig(adapt_head_b="whiten").validate()
    with pytest.raises(TrainConfigError, match="adapts a closed-form start"):
        TrainConfig(adapt_head_b="mean", init="random").validate()
    with pytest.raises(TrainConfigError, match="needs init ridge-to-multilingual and head_b kernel"):
        TrainConfig(adapt_head_b="self-learning", head_b="mlp").validate()
    TrainConfig(adapt_head_b="coral", head_b="mlp").validate()

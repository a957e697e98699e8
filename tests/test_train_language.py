"""Issue-13 training options: the language subspace Head_A removes (training and ONNX alike), closed-form
starts, per-language soft retrieval, and the trainer running with them."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from uclip_cli.train.closed_form import closed_form_start, procrustes, set_linear
from uclip_cli.train.config import TrainConfig, TrainConfigError
from uclip_cli.train.data import TrainInputs
from uclip_cli.train.heads import (HEAD_A, ONNX_INPUT, ONNX_OUTPUT, ProjectionHead, UCLIPHeads, export_heads_onnx,
                                   load_heads, save_heads)
from uclip_cli.subspaces import language_directions, language_means
from uclip_cli.train.retrieval import balanced_languages, precompute_targets_per_language
from uclip_cli.train.trainer import train_heads
from conftest import unit_rows as unit
from rounding import assert_within, gamma
from test_train_retrieval import reference_and_bound

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def languages_world(rng, n_per_language=200, d=24, languages=3, offset=1.5):
    """Sentences = content + an offset per language (English: its own offset too), L2-normalised."""
    offsets = rng.standard_normal((languages + 1, d)) * offset / np.sqrt(d)
    content = rng.standard_normal((n_per_language * (languages + 1), d)) / np.sqrt(d)
    label = np.repeat(np.arange(languages + 1), n_per_language)
    return unit(content + offsets[label]).astype(np.float32), label, content, offsets


# ---------------------------------------------------------------- the removed language subspace

def test_language_means_are_the_per_language_means_of_normalised_rows():
    rng = np.random.default_rng(0)
    rows, label, _, _ = languages_world(rng)
    english, foreign, foreign_label = rows[label == 0], rows[label > 0], label[label > 0]
    means = language_means(english * 3.0, foreign, foreign_label)        # scale: rows are normalised first
    expected = np.stack([english.astype(np.float64).mean(0)] +
                        [foreign[foreign_label == l].astype(np.float64).mean(0) for l in (1, 2, 3)])
    assert_within(means, expected, 4 * gamma(len(rows)), "language means")
    # no labels: the whole memory is one group
    assert language_means(english, foreign, None).shape == (2, rows.shape[1])


def test_head_a_forgets_which_language_a_sentence_is_in():
    """Two sentences with the same content in two languages reach Head_A's layers as the same vector
    once the span of the language means is removed (the content's own part in that span aside)."""
    rng = np.random.default_rng(1)
    rows, label, content, offsets = languages_world(rng, offset=3.0)
    basis = language_directions(rows[label == 0], rows[label > 0], label[label > 0])
    assert basis.shape == (rows.shape[1], 4)
    assert_within(basis.T.astype(np.float64) @ basis, np.eye(4), 8 * gamma(rows.shape[1]), "orthonormal basis")
    head = ProjectionHead(rows.shape[1], 8, removed_directions=4)
    head.set_removed(torch.from_numpy(basis))
    same = rng.standard_normal((1, rows.shape[1])) / np.sqrt(rows.shape[1])
    in_each_language = unit(same + offsets).astype(np.float32)            # one content, four languages
    with torch.no_grad():
        seen = head.prepare(torch.from_numpy(in_each_language)).double().numpy()
    spread_before = np.linalg.norm(in_each_language - in_each_language.mean(0), axis=1).max()
    spread_after = np.linalg.norm(seen - seen.mean(0), axis=1).max()
    assert spread_before > 0.5 and spread_after < 0.2 * spread_before
    assert np.abs(seen @ basis).max() < 1e-5                               # nothing left along the removed span


def test_removed_subspace_is_inside_head_a_onnx_and_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    rows, label, _, _ = languages_world(rng)
    basis = language_directions(rows[label == 0], rows[label > 0], label[label > 0])
    torch.manual_seed(0)
    heads = UCLIPHeads(rows.shape[1], 12, 16, language_directions=basis.shape[1])
    heads.head_a.set_removed(torch.from_numpy(basis))
    with torch.no_grad():                   # running statistics as training leaves them
        heads.head_a.net[1].running_mean.normal_(0, 0.1)
        heads.head_a.net[1].running_var.uniform_(0.5, 2.0)
    heads.eval()
    export_heads_onnx(heads, tmp_path)     # raises when ONNX and PyTorch differ
    session = ort.InferenceSession(str(tmp_path / HEAD_A), providers=["CPUExecutionProvider"])
    x = rows[:5]
    shifted = unit(x + 0.7 * basis[:, :1].T).astype(np.float32)   # a move inside the removed span only
    run = lambda v: session.run([ONNX_OUTPUT], {ONNX_INPUT: v})[0]
    with torch.no_grad():
        expected = heads.head_a(torch.from_numpy(x)).double().numpy()
    assert_within(run(x), expected, 1e-5, "head_a.onnx against PyTorch")
    assert np.abs(run(shifted) - run(x)).max() < 1e-4                   # the ONNX graph removes it too
    no_projection = UCLIPHeads(rows.shape[1], 12, 16)
    no_projection.head_a.net.load_state_dict(heads.head_a.net.state_dict())
    with torch.no_grad():
        plain = no_projection.eval().head_a(torch.from_numpy(np.concatenate([x, shifted]))).numpy()
    assert np.abs(plain[:5] - plain[5:]).max() > 1e-2                   # without it, the move shows

    save_heads(heads, tmp_path / "heads.safetensors")
    loaded, meta = load_heads(tmp_path / "heads.safetensors")
    assert meta["dims"]["language_directions"] == basis.shape[1]
    assert torch.equal(loaded.head_a.removed, heads.head_a.removed)
    assert loaded.head_b.removed is None


# ---------------------------------------------------------------- closed-form starts

def test_a_head_computes_a_linear_map_exactly_after_set_linear():
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((400, 10))).astype(np.float32)
    mapping = rng.standard_normal((10, 7))
    head = ProjectionHead(10, 7, hidden_mult=3)         # wider than 2d: the extra units stay silent
    set_linear(head, x, mapping)
    with torch.no_grad():
        got = head.eval()(torch.from_numpy(x[:50])).double().numpy()
    y = x[:50].astype(np.float64) @ mapping
    expected = y / np.linalg.norm(y, axis=1, keepdims=True)
    # three float32 layers of at most 30 terms, BatchNorm's eps folded into the variance: a few gamma(30)
    # relative to the magnitudes involved (|x| <= 1, mapping entries ~ 1, standardised hidden units ~ 1/s)
    scale = np.abs(mapping).sum() / np.linalg.norm(y, axis=1, keepdims=True) / x.std(0).min()
    assert_within(got, expected, 16 * gamma(30) * scale, "head as a linear map")
    with pytest.raises(ValueError, match="at least 2 x 10"):
        set_linear(ProjectionHead(10, 7, hidden_mult=1), x, mapping)


def test_ridge_start_aligns_english_anchors_and_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(4)
    e_K = unit(rng.standard_normal((2000, 12))).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    e_I = (e_K.astype(np.float64) @ rotation).astype(np.float32)
    assert_within(procrustes(e_K.astype(np.float64), e_I.astype(np.float64)), rotation, 1e-9, "procrustes")
    for kind in ("ridge", "procrustes", "ridge-to-multilingual"):
        torch.manual_seed(0)
        heads = UCLIPHeads(12, 12, 16)
        info = closed_form_start(heads, e_I, e_K, kind)
        assert info["init"] == kind
        with torch.no_grad():
            heads.eval()
            cos = (heads.head_a(torch.from_numpy(e_K[:100])) * heads.head_b(torch.from_numpy(e_I[:100]))).sum(-1)
        assert float(cos.min()) > 0.99, kind       # each English caption lands on itself from the start
    torch.manual_seed(0)
    random_heads = UCLIPHeads(12, 12, 16).eval()
    with torch.no_grad():
        cos = (random_heads.head_a(torch.from_numpy(e_K[:100])) * random_heads.head_b(torch.from_numpy(e_I[:100]))).sum(-1)
    assert float(cos.mean()) < 0.5


def test_ridge_to_multilingual_keeps_the_multilingual_space_for_foreign_text():
    """Head_A starts as the multilingual space itself (minus the removed subspace): any sentence, also one
    of a language no anchor is in, reaches the shared space with the similarities the encoder gives it."""
    rng = np.random.default_rng(8)
    rows, label, _, _ = languages_world(rng, n_per_language=300, d=12)
    e_K, foreign = rows[label == 0], rows[label > 0]
    e_I = unit(e_K @ rng.standard_normal((12, 20))).astype(np.float32)
    basis = language_directions(e_K, foreign, label[label > 0])
    torch.manual_seed(0)
    heads = UCLIPHeads(12, 20, 16, language_directions=basis.shape[1])
    heads.head_a.set_removed(torch.from_numpy(basis))
    closed_form_start(heads, e_I, e_K, "ridge-to-multilingual")
    x = foreign[::50]
    with torch.no_grad():
        got = heads.eval().head_a(torch.from_numpy(x)).double().numpy()
        seen = heads.head_a.prepare(torch.from_numpy(x)).double().numpy()     # the input minus the subspace
        anchors_seen = heads.head_a.prepare(torch.from_numpy(e_K)).double().numpy()
    expected = np.zeros((len(x), 16))
    expected[:, :12] = seen / np.linalg.norm(seen, axis=1, keepdims=True)    # identity, zero-padded
    # as in test_a_head_computes_a_linear_map_exactly_after_set_linear: a few gamma(30) of the magnitudes
    scale = 12 / np.linalg.norm(seen, axis=1, keepdims=True) / anchors_seen.std(0)[anchors_seen.std(0) > 1e-3].min()
    assert_within(got, expected, 16 * gamma(30) * scale, "Head_A as the identity embedding")
    assert_within(got @ got.T, expected @ expected.T, 2 * 16 * gamma(30) * scale.max(), "similarities kept")


def test_a_frozen_head_a_stays_its_closed_form_start_while_head_b_trains():
    from uclip_cli.train.head_setup import build_heads

    rng = np.random.default_rng(9)
    rows, label, _, _ = languages_world(rng, n_per_language=160, d=16)
    e_K = rows[label == 0]
    e_I = unit(e_K @ rng.standard_normal((16, 20))).astype(np.float32)
    image_memory = unit(rng.standard_normal((200, 20))).astype(np.float32)
    inputs = TrainInputs(e_I, e_K, image_memory, rows[label > 0], foreign_language=(label[label > 0] - 1).astype(np.int16),
                         foreign_languages=("cs", "fi", "hr"))
    trained = {}
    for freeze in (True, False):
        config = TrainConfig(batch_size=32, epochs=2, device="cpu", heldout_fraction=0.0, language_projection=True,
                             init="ridge-to-multilingual", freeze_head_a=freeze, seed=3, refine=True)
        torch.manual_seed(config.seed)
        start = build_heads(inputs, config)[0].state_dict()
        result = train_heads(inputs, config)
        trained[freeze] = result.heads.state_dict()
        assert result.start["init"] == "ridge-to-multilingual"
        assert (result.start.get("head_a") == "frozen") == freeze
        changed = {k for k in start if not torch.equal(start[k], trained[freeze][k])}
        assert any(k.startswith("head_b.") for k in changed)
        # frozen: every weight and BatchNorm statistic of Head_A as it started; trained: Head_A moved
        assert (not any(k.startswith("head_a.") for k in changed)) == freeze, changed
    with pytest.raises(TrainConfigError, match="freeze_head_a needs a closed-form start"):
        TrainConfig(freeze_head_a=True, init="random").validate()


# ---------------------------------------------------------------- per-language soft retrieval

def test_languages_are_balanced_across_anchors_and_seeded():
    assigned = balanced_languages(1003, np.array([3, 5, 7]), seed=0)
    counts = np.bincount(assigned)[[3, 5, 7]]
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1003
    assert np.array_equal(assigned, balanced_languages(1003, np.array([3, 5, 7]), seed=0))
    assert not np.array_equal(assigned, balanced_languages(1003, np.array([3, 5, 7]), seed=1))


def test_each_anchor_retrieves_only_from_its_language():
    rng = np.random.default_rng(5)
    queries = unit(rng.standard_normal((60, 16))).astype(np.float32)
    memory = unit(rng.standard_normal((90, 16))).astype(np.float32)
    language = np.array([0] * 30 + [1] * 20 + [2] * 40)
    language[::7] = 2                                    # one language's rows need not be contiguous
    targets, mass, assigned = precompute_targets_per_language(queries, memory, language, 0.05, seed=0, memory_chunk=16)
    assert np.all(mass == 1.0)
    for code in (0, 1, 2):
        picked = assigned == code
        expected, bound = reference_and_bound(queries[picked], memory[language == code], 0.05)
        assert_within(targets[picked], expected, bound, f"targets of language {code}")


# ---------------------------------------------------------------- the trainer with the options

def test_trainer_runs_every_option_and_records_the_start(tmp_path):
    rng = np.random.default_rng(6)
    rows, label, _, _ = languages_world(rng, n_per_language=160, d=16)
    e_K = rows[label == 0]
    e_I = unit(e_K @ rng.standard_normal((16, 20))).astype(np.float32)
    image_memory = unit(rng.standard_normal((200, 20))).astype(np.float32)
    config = TrainConfig(batch_size=32, epochs=2, device="cpu", heldout_fraction=0.0, language_projection=True,
                         retrieval_per_language=True, init="ridge", refine=True)
    inputs = TrainInputs(e_I, e_K, image_memory, rows[label > 0], foreign_language=(label[label > 0] - 1).astype(np.int16),
                         foreign_languages=("cs", "fi", "hr"))
    result = train_heads(inputs, config)
    assert result.start["language_directions"] == 4 and result.start["init"] == "ridge"
    assert result.start["languages"] == ["cs", "fi", "hr"]
    assert result.heads.head_a.removed_directions == 4
    assert result.training_info()["start"] == result.start
    assert all(np.isfinite(e.train["total"]) for e in result.history)
    with pytest.raises(TrainConfigError, match="language of each foreign-memory row"):
        train_heads(TrainInputs(e_I, e_K, image_memory, rows[label > 0]),
                    TrainConfig(batch_size=32, epochs=1, device="cpu", retrieval_per_language=True, refine=True))
    with pytest.raises(TrainConfigError, match="init='pca'"):
        TrainConfig(init="pca").validate()


# ---------------------------------------------------------------- uclip train with the options

def test_uclip_train_options_put_the_language_subspace_into_the_bundles_head_a(tmp_path, tiny_bundle):
    from cli_helpers import copy_bundle, invoke_uclip, uclip_env
    from uclip_cli import bundle as B

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    env = uclip_env(tmp_path, bundle=bundle, index=tmp_path / "index")
    words = {"en": ["dog", "cat", "boat", "house"], "cs": ["pes", "kočka", "loď", "dům"], "fi": ["koira", "kissa", "vene", "talo"]}
    places = {"en": ["on a beach", "in a park", "near a lake"], "cs": ["na pláži", "v parku", "u jezera"],
              "fi": ["rannalla", "puistossa", "järven lähellä"]}
    files = {}
    for lang in words:
        lines = [f"{n} {w} {p}" for n in range(1, 5) for w in words[lang] for p in places[lang]]   # 48 each
        files[lang] = tmp_path / f"{lang}.txt"
        files[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    d_clip = B.load_bundle(bundle).dims["clip"]
    np.save(tmp_path / "images.npy", unit(np.random.default_rng(0).standard_normal((64, d_clip))).astype(np.float32))
    common = ["train", "--captions", files["en"], "--foreign", f"cs={files['cs']}", "--foreign", f"fi={files['fi']}",
              "--image-features", tmp_path / "images.npy", "--batch-size", "16", "--epochs", "2", "--no-progress"]

    bad = invoke_uclip([*common, "--init", "pca"], env)
    assert "init='pca'" in bad.one_line_error()

    invoke_uclip([*common, "--language-projection", "--retrieval-per-language", "--init", "ridge"], env).ok()
    start = B.load_bundle(bundle).manifest["training"]["start"]
    assert start["language_directions"] == 3 and start["languages"] == ["cs", "fi"] and start["init"] == "ridge"
    heads, _ = load_heads(bundle / B.HEADS_WEIGHTS)
    basis = heads.head_a.removed.numpy()
    session = ort.InferenceSession(str(bundle / HEAD_A), providers=["CPUExecutionProvider"])
    x = unit(np.random.default_rng(1).standard_normal((4, basis.shape[0]))).astype(np.float32)
    moved = unit(x + 0.5 * basis.sum(axis=1)).astype(np.float32)
    run = lambda v: session.run([ONNX_OUTPUT], {ONNX_INPUT: v})[0]
    assert np.abs(run(moved) - run(x)).max() < 1e-4         # the bundle's Head_A forgets the language offsets


def test_the_start_is_fitted_on_training_anchors_only():
    """Held-out captions stay held out: changing them does not change the closed-form start or the subspace."""
    from uclip_cli.train.head_setup import build_heads

    rng = np.random.default_rng(7)
    e_K = unit(rng.standard_normal((600, 12))).astype(np.float32)
    e_I = unit(e_K @ rng.standard_normal((12, 16))).astype(np.float32)
    foreign = unit(rng.standard_normal((100, 12)) + 1.0).astype(np.float32)
    config = TrainConfig(init="ridge", language_projection=True)
    training = np.arange(500)
    starts = []
    for held_out in (e_K[500:], unit(rng.standard_normal((100, 12))).astype(np.float32)):
        inputs = TrainInputs(e_I, np.concatenate([e_K[:500], held_out]), e_I, foreign)
        torch.manual_seed(0)
        starts.append(build_heads(inputs, config, anchor_rows=training)[0].state_dict())
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])

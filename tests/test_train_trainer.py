"""The trainer end to end on tiny features: learns, resumes exactly, refuses bad inputs, writes usable heads."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import uclip_cli.train.trainer as trainer_module
from uclip_cli.train.config import TrainConfig
from uclip_cli.train.data import TrainInputError
from uclip_cli.train.heads import UCLIPHeads, export_heads_onnx, load_heads, save_heads
from uclip_cli.train.features import save_features
from uclip_cli.train.trainer import _Stepper, train_from_feature_files, train_heads
from conftest import unit_rows as unit


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny matrices: one thread is fastest on shared cores


def world(seed=0, n=1000, m=600, d_clip=24, d_multi=16, latent=8):
    """Captions share a latent meaning seen through two linear 'encoders'; memories hold other meanings."""
    rng = np.random.default_rng(seed)
    clip_map, multi_map = rng.standard_normal((latent, d_clip)), rng.standard_normal((latent, d_multi))
    foreign_map = multi_map + 0.3 * rng.standard_normal((latent, d_multi))
    z = rng.standard_normal((n, latent))
    english_clip = unit(z @ clip_map + 0.2 * rng.standard_normal((n, d_clip)))
    english_multi = unit(z @ multi_map + 0.2 * rng.standard_normal((n, d_multi)))
    image_memory = unit(rng.standard_normal((m, latent)) @ clip_map + 0.2 * rng.standard_normal((m, d_clip)) + 0.5)
    foreign_memory = unit(rng.standard_normal((m, latent)) @ foreign_map + 0.2 * rng.standard_normal((m, d_multi)))
    return english_clip, english_multi, image_memory, foreign_memory


def small(**overrides):
    return TrainConfig(**{"batch_size": 64, "epochs": 2, "d_shared": 16, "heldout_fraction": 0.1,
                          "retrieval_memory_chunk": 256, **overrides})


def test_tiny_end_to_end_learns_and_writes_heads_that_round_trip(tmp_path):
    inputs = world()
    events = []
    result = train_heads(*inputs, small(), progress=events.append)

    assert len(result.history) == 2 and result.sizes == {
        "captions": 900, "heldout_captions": 100, "image_memory": 600, "foreign_memory": 600}
    first, last = result.history
    assert last.train["total"] < first.train["total"]
    assert last.heldout["total"] < 0.85 * result.initial_heldout["total"]
    assert last.heldout["text"] < result.initial_heldout["text"]
    assert set(last.heldout) == {"text", "pseudo", "intra", "total"}

    train_events = [e for e in events if e.stage == "train"]
    assert train_events[-1].done == train_events[-1].total == 2 * (900 // 64)
    assert all(e.rate > 0 and e.unit == "steps" for e in train_events)
    assert [e.done for e in events if e.stage == "epoch"] == [1, 2]
    assert {e.stage for e in events} >= {"retrieve_image", "retrieve_foreign"}
    assert result.timings["captions_per_s"] > 0 and result.device == "cpu"
    json.dumps(result.training_info())          # goes into the bundle manifest

    save_heads(result.heads, tmp_path / "heads.safetensors", config=result.config)
    loaded, meta = load_heads(tmp_path / "heads.safetensors")
    x_multi, x_clip = torch.from_numpy(inputs[1][:10]), torch.from_numpy(inputs[0][:10])
    with torch.no_grad():
        assert torch.equal(loaded.head_a(x_multi), result.heads.head_a(x_multi))
        assert torch.equal(loaded.head_b(x_clip), result.heads.head_b(x_clip))
    assert TrainConfig.from_dict(meta["train_config"]) == result.config

    diffs = export_heads_onnx(result.heads, tmp_path)
    assert max(diffs.values()) <= 1e-5
    session = ort.InferenceSession(str(tmp_path / "head_a.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"features": inputs[1][:10]})[0],
                                   result.heads.head_a(x_multi).numpy(), atol=1e-5)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    inputs = world(1)
    config = small(epochs=3)
    straight = train_heads(*inputs, config, checkpoint_dir=tmp_path / "a")

    def stop_after_first_epoch(event):
        if event.stage == "epoch" and event.done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_heads(*inputs, config, checkpoint_dir=tmp_path / "b", progress=stop_after_first_epoch)
    assert sorted(p.name for p in (tmp_path / "b").glob("epoch-*")) == ["epoch-0001.json", "epoch-0001.safetensors"]
    resumed = train_heads(*inputs, config, checkpoint_dir=tmp_path / "b")

    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    for (name, a), (_, b) in zip(straight.heads.state_dict().items(), resumed.heads.state_dict().items()):
        assert torch.equal(a, b), name
    assert [e.train for e in resumed.history] == [e.train for e in straight.history]
    assert sorted(p.name for p in (tmp_path / "b").glob("epoch-*")) == ["epoch-0003.json", "epoch-0003.safetensors"]
    # a finished run resumes to itself without training
    again = train_heads(*inputs, config, checkpoint_dir=tmp_path / "b")
    assert again.resumed_from_epoch == 3 and again.timings["train_s"] == 0
    for (name, a), (_, b) in zip(straight.heads.state_dict().items(), again.heads.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_of_other_settings_or_inputs_is_refused(tmp_path):
    inputs = world(2)
    train_heads(*inputs, small(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(TrainInputError, match="other settings \\(lambda_intra\\)"):
        train_heads(*inputs, small(epochs=1, lambda_intra=0.5), checkpoint_dir=tmp_path)
    with pytest.raises(TrainInputError, match="other feature files"):
        train_heads(*world(3), small(epochs=1), checkpoint_dir=tmp_path)


def test_retrieval_targets_are_computed_once_and_reused_on_resume(tmp_path, monkeypatch):
    calls = []
    real = trainer_module.precompute_targets
    monkeypatch.setattr(trainer_module, "precompute_targets", lambda *a, **k: calls.append(k["stage"]) or real(*a, **k))
    inputs = world(4)
    train_heads(*inputs, small(epochs=3), checkpoint_dir=tmp_path)
    assert calls == ["retrieve_image", "retrieve_foreign"]        # once per memory, not per epoch or step
    train_heads(*inputs, small(epochs=3), checkpoint_dir=tmp_path)
    assert len(calls) == 2                                        # cached beside the checkpoints


def test_bad_inputs_are_refused_before_any_work():
    e_I, e_K, img, fgn = world(5)
    fgn = fgn.copy()
    fgn[17, 3] = np.inf
    events = []
    with pytest.raises(TrainInputError, match="foreign.npy: row 17 holds NaN or infinite"):
        train_heads(e_I, e_K, img, fgn, small(), progress=events.append, names={"foreign_memory": "foreign.npy"})
    with pytest.raises(TrainInputError, match="image_memory: 50 rows, fewer than the 64"):
        train_heads(e_I, e_K, img[:50], world(5)[3], small(), progress=events.append)
    assert events == []


def test_ablation_switches_change_what_is_optimised():
    inputs = world(6, n=400)
    no_text = train_heads(*inputs, small(epochs=1, use_text=False))
    log = no_text.history[0].train
    assert log["total"] == pytest.approx(log["pseudo"] + 0.1 * log["intra"], rel=1e-5)
    top_k = train_heads(*inputs, small(epochs=1, retrieval_topk=16))
    assert set(top_k.retrieval_mass) == {"image", "foreign"}
    assert all(0 < m["min"] <= m["mean"] <= 1 + 1e-6 for m in top_k.retrieval_mass.values())
    no_noise = train_heads(*inputs, small(epochs=1, use_noise=False))
    with_noise = train_heads(*inputs, small(epochs=1))
    assert no_noise.history[0].train != with_noise.history[0].train


def test_learning_rate_decays_linearly_to_zero():
    heads = UCLIPHeads(4, 6, 8)
    stepper = _Stepper(heads, TrainConfig(lr=1e-3, batch_size=8), torch.device("cpu"), total_steps=10)
    batch = [torch.nn.functional.normalize(torch.randn(8, d), dim=-1) for d in (6, 4, 6, 4)]
    seen = []
    for step in range(10):
        stepper.step(step, batch, torch.Generator().manual_seed(step))
        seen.append(stepper.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3 * (1 - s / 10) for s in range(10)])
    assert stepper.optimizer.param_groups[0]["weight_decay"] == 0.0


def test_training_from_feature_files_names_the_bad_file(tmp_path):
    names = ("en_clip.npy", "en_multi.npy", "images.npy", "foreign.npy")
    for name, array in zip(names, world(7, n=300)):
        save_features(tmp_path / name, array)
    paths = [tmp_path / n for n in names]
    result = train_from_feature_files(*paths, small(epochs=1), dims={"clip": 24, "multilingual": 16})
    assert result.sizes["captions"] == 270
    with pytest.raises(TrainInputError, match="en_multi.npy: features are 16-d but 384-d are expected"):
        train_from_feature_files(*paths, small(epochs=1), dims={"clip": 24, "multilingual": 384})

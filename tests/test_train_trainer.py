"""The trainer end to end on tiny features: learns, resumes exactly, refuses bad inputs, writes usable heads."""
import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import uclip_cli.train.trainer as trainer_module
from uclip_cli.train.config import PAPER_START, TrainConfig
from uclip_cli.train.data import TrainInputError, TrainInputs
from uclip_cli.train.heads import UCLIPHeads, export_heads_onnx, load_heads, save_heads
from uclip_cli.train.features import save_features
from uclip_cli.train.trainer import _Stepper, train_from_feature_files, train_heads
from conftest import unit_rows as unit
from rounding import assert_float32_run_of, assert_within, exact_inputs, gamma


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
    return TrainInputs(english_clip, english_multi, image_memory, foreign_memory)


def small(**overrides):
    """The contrastive trainer's settings (refine: these tests are about its steps, whatever the start)."""
    return TrainConfig(**{"batch_size": 64, "epochs": 2, "d_shared": 16, "heldout_fraction": 0.1,
                          "retrieval_memory_chunk": 256, "refine": True, **overrides})


def test_tiny_end_to_end_learns_and_writes_heads_that_round_trip(tmp_path):
    inputs = world()
    events = []
    result = train_heads(inputs, small(**PAPER_START), progress=events.append)   # from random heads: it learns

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
    assert [e.step for e in result.history] == [14, 28] and result.stop_reason.startswith("finished the 2-epoch")
    assert {e.stage for e in events} >= {"retrieve_image", "retrieve_foreign"}
    assert result.timings["captions_per_s"] > 0 and result.device == "cpu"
    json.dumps(result.training_info())          # goes into the bundle manifest

    save_heads(result.heads, tmp_path / "heads.safetensors", config=result.config)
    loaded, meta = load_heads(tmp_path / "heads.safetensors")
    x_multi, x_clip = torch.from_numpy(inputs.english_multi[:10]), torch.from_numpy(inputs.english_clip[:10])
    with torch.no_grad():
        assert torch.equal(loaded.head_a(x_multi), result.heads.head_a(x_multi))
        assert torch.equal(loaded.head_b(x_clip), result.heads.head_b(x_clip))
    assert TrainConfig.from_dict(meta["train_config"]) == result.config

    figures = export_heads_onnx(result.heads, tmp_path)
    assert all(f["max_abs_diff"] <= f["bound"] for f in figures.values())
    session = ort.InferenceSession(str(tmp_path / "head_a.onnx"), providers=["CPUExecutionProvider"])
    assert_float32_run_of(session.run(None, {"features": inputs.english_multi[:10]})[0],
                          copy.deepcopy(result.heads.head_a).double().eval(), exact_inputs(inputs.english_multi[:10]))


def _same_heads(a, b):
    for (name, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y), name


def _run_messages(messages: list[str]) -> list[str]:
    """The log without the line on the languages found in a one-group foreign memory (head_setup's, issue 20)."""
    return [m for m in messages if not m.startswith("languages detected in ")]


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    inputs = world(1)
    config = small(epochs=None, max_steps=36, eval_every=6, patience=100)     # step schedule, 6 evaluations
    straight = train_heads(inputs, config, runs_dir=tmp_path / "a")

    def stop_at_step_12(event):
        if event.stage == "step" and event.done == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_heads(inputs, config, runs_dir=tmp_path / "b", progress=stop_at_step_12)
    [run] = [p for p in (tmp_path / "b").iterdir() if p.is_dir()]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000012.json", "step-000000012.safetensors"]
    messages = []
    resumed = train_heads(inputs, config, runs_dir=tmp_path / "b", log=messages.append)

    assert _run_messages(messages) == [f"resuming run {resumed.run_id} from step 12 of 36 (epoch 0.9)"]
    assert resumed.resumed_from_step == 12 and [e.step for e in resumed.history] == [6, 12, 18, 24, 30, 36]
    _same_heads(straight, resumed)
    assert [e.train for e in resumed.history] == [e.train for e in straight.history]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000036.json", "step-000000036.safetensors"]
    # a finished run is reused as it is, without training
    again = train_heads(inputs, config, runs_dir=tmp_path / "b", log=messages.append)
    assert messages[-1] == f"run {resumed.run_id} had finished at step 36: nothing to train, its heads are used"
    assert again.timings["train_s"] == 0 and again.stop_reason == straight.stop_reason
    _same_heads(straight, again)


def test_changed_settings_or_inputs_start_a_new_run_and_keep_the_old_one(tmp_path):
    """Issue 7 item 3.2: training again with other epochs or other inputs was refused; now it starts a new run."""
    inputs = world(2)
    messages = []
    first = train_heads(inputs, small(epochs=1), runs_dir=tmp_path, log=messages.append)
    assert _run_messages(messages) == [f"starting run {first.run_id} in {tmp_path / first.run_id}"]
    second = train_heads(inputs, small(epochs=3), runs_dir=tmp_path, log=messages.append)
    assert second.run_id != first.run_id and len(second.history) == 3
    assert messages[-1] == (f"settings changed (epochs 1 -> 3): starting a new run {second.run_id} "
                            f"(run {first.run_id} stays in {tmp_path / first.run_id})")
    third = train_heads(world(3), small(epochs=3), runs_dir=tmp_path, log=messages.append)
    assert messages[-1].startswith("inputs changed (other captions, memories or feature files): starting a new run")
    runs = {p.name: json.loads((p / "run.json").read_text()) for p in tmp_path.iterdir() if p.is_dir()}
    assert set(runs) == {first.run_id, second.run_id, third.run_id}
    assert all(r["state"] == "finished" and r["stop_reason"] for r in runs.values())
    assert all(any((tmp_path / r).glob("step-*.safetensors")) for r in runs)      # nothing deleted
    back = train_heads(inputs, small(epochs=1), runs_dir=tmp_path, log=messages.append)   # the first command again
    assert back.run_id == first.run_id and back.timings["train_s"] == 0
    _same_heads(first, back)


def test_step_schedule_trains_longer_than_five_epochs_on_few_captions_and_stops_on_the_heldout_loss():
    """Issue 8: 5 epochs of a few thousand captions are a few dozen steps; the default schedule is by steps."""
    inputs = world(8, n=700)
    paper = train_heads(inputs, small(epochs=5))
    default = train_heads(inputs, small(epochs=None, min_steps=300, patience=3))
    assert paper.total_steps == 5 * 9 and paper.stop_reason == "finished the 5-epoch schedule (45 steps), as --epochs asked"
    assert default.total_steps == 300 and default.steps > paper.steps
    assert default.history[-1].heldout is not None
    best = min(e.heldout["total"] for e in default.history)
    assert default.best_step == next(e.step for e in default.history if e.heldout["total"] == best)
    if default.steps < default.total_steps:         # stopped early: the last `patience` evaluations were no better
        assert default.stop_reason.startswith("held-out loss did not improve for 3 evaluations")
        assert all(e.heldout["total"] >= best for e in default.history[-3:])
    else:
        assert default.stop_reason.startswith("ran the whole step budget (300 steps")
    assert f"step {default.best_step}" in default.stop_reason or "still improving" in default.stop_reason
    assert default.history[-1].heldout["total"] >= best and best < paper.history[-1].heldout["total"]


def test_early_stopping_keeps_the_best_heads_not_the_last(monkeypatch):
    """A held-out loss that rises after step 20 stops training after `patience` worse evaluations and keeps step 20."""
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 9.0, 9.0])
    kept = {}
    real = trainer_module.evaluate_losses

    def scripted(heads, data, config, device):
        real(heads, data, config, device)
        value = next(losses)
        kept[value] = {k: v.clone() for k, v in heads.state_dict().items()}
        return {"text": value, "pseudo": 0.0, "intra": 0.0, "total": value}

    monkeypatch.setattr(trainer_module, "evaluate_losses", scripted)
    result = train_heads(world(9, n=700), small(epochs=None, min_steps=60, eval_every=10, patience=3))
    assert [e.step for e in result.history] == [10, 20, 30, 40, 50]       # initial + 5 evaluations used 6 losses
    assert result.best_step == 20 and "kept the heads of step 20 (held-out loss 3.0000)" in result.stop_reason
    assert result.stop_reason.startswith("held-out loss did not improve for 3 evaluations (30 steps): stopped at step 50 of 60")
    for name, value in result.heads.state_dict().items():
        assert torch.equal(value, kept[3.0][name]), name


def test_retrieval_targets_are_computed_once_and_reused_on_resume(tmp_path, monkeypatch):
    calls = []
    real = trainer_module.precompute_targets
    monkeypatch.setattr(trainer_module, "precompute_targets", lambda *a, **k: calls.append(k["stage"]) or real(*a, **k))
    inputs = world(4)
    train_heads(inputs, small(epochs=3), runs_dir=tmp_path)
    assert calls == ["retrieve_image", "retrieve_foreign"]        # once per memory, not per epoch or step
    train_heads(inputs, small(epochs=3), runs_dir=tmp_path)
    train_heads(inputs, small(epochs=4, lr=5e-4), runs_dir=tmp_path)   # another run on the same inputs
    assert len(calls) == 2                                        # cached beside the runs


def test_bad_inputs_are_refused_before_any_work():
    e_I, e_K, img, fgn = world(5).arrays()
    fgn = fgn.copy()
    fgn[17, 3] = np.inf
    events = []
    with pytest.raises(TrainInputError, match="foreign.npy: row 17 holds NaN or infinite"):
        train_heads(TrainInputs(e_I, e_K, img, fgn, names={"foreign_memory": "foreign.npy"}), small(),
                    progress=events.append)
    with pytest.raises(TrainInputError, match="english_clip: 45 training captions \\(after holding out 5\\) is fewer than one batch of 64"):
        train_heads(TrainInputs(e_I[:50], e_K[:50], img, fgn), small(), progress=events.append)
    assert events == []


def test_a_memory_smaller_than_a_batch_trains():
    """Issue 8: a memory smaller than the batch is fine (the soft-retrieval targets are just near-duplicates)."""
    e_I, e_K, img, fgn = world(5).arrays()
    result = train_heads(TrainInputs(e_I, e_K, img[:5], fgn[:3]), small(epochs=1))
    assert result.sizes["image_memory"] == 5 and result.sizes["foreign_memory"] == 3 and len(result.history) == 1


def test_ablation_switches_change_what_is_optimised():
    inputs = world(6, n=400)
    no_text = train_heads(inputs, small(epochs=1, use_text=False))
    log = no_text.history[0].train
    # each step's total is a float32 sum (pseudo + float32(0.1) * intra); a logged mean sums at most the
    # 360 // 64 steps of this one-epoch run in float32
    steps = 360 // 64
    assert_within(log["total"], log["pseudo"] + 0.1 * log["intra"],
                  (gamma(3) + 2 * gamma(steps + 1)) * (log["pseudo"] + 0.1 * log["intra"]))
    top_k = train_heads(inputs, small(epochs=1, retrieval_topk=16))
    assert set(top_k.retrieval_mass) == {"image", "foreign"}
    # a share of the softmax normaliser, both sums over the 600 memory rows in float32
    assert all(0 < m["min"] <= m["mean"] <= 1 + 2 * gamma(2 * 600) for m in top_k.retrieval_mass.values())
    no_noise = train_heads(inputs, small(epochs=1, use_noise=False))
    with_noise = train_heads(inputs, small(epochs=1))
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
    for name, array in zip(names, world(7, n=300).arrays()):
        save_features(tmp_path / name, array)
    paths = [tmp_path / n for n in names]
    result = train_from_feature_files(*paths, small(epochs=1), dims={"clip": 24, "multilingual": 16})
    assert result.sizes["captions"] == 270
    with pytest.raises(TrainInputError, match="en_multi.npy: features are 16-d but 384-d are expected"):
        train_from_feature_files(*paths, small(epochs=1), dims={"clip": 24, "multilingual": 384})

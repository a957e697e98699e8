"""Training settings: the paper's defaults, validation, and the round trip used by checkpoints and manifests."""
import json
import math

import pytest

from uclip_cli.train.config import PAPER_START, TrainConfig, TrainConfigError


def test_losses_are_the_papers_and_the_start_is_uclips():
    c = TrainConfig()
    assert (c.tau, c.tau_retrieval, c.noise_variance, c.lambda_intra) == (0.01, 0.01, 0.004, 0.1)
    assert c.sigma == pytest.approx(math.sqrt(0.004))
    assert (c.batch_size, c.hidden_mult, c.d_shared) == (512, 2, 512)
    assert c.use_text and c.use_pseudo and c.use_intra and c.use_noise
    assert c.retrieval_topk is None            # exact softmax over the whole memory
    c.validate()
    # uclip's start (README: both yardsticks, 3 seeds): language and modality subspaces removed, the shared space
    # starts as the multilingual space and Head_A stays there, Head_B a kernel regressor into it, fitted in closed
    # form and kept (no contrastive refinement; with --refine, at a tenth of the paper's learning rate)
    assert (c.language_projection, c.modality_projection, c.init, c.head_a_frozen, c.head_b, c.refined, c.lr) == \
        (True, True, "ridge-to-multilingual", True, "kernel", False, 1e-4)
    paper = TrainConfig(**PAPER_START, epochs=5).validate()
    assert (paper.language_projection, paper.modality_projection, paper.init, paper.head_a_frozen, paper.head_b,
            paper.refined, paper.lr) == (False, False, "random", False, "mlp", True, 1e-3)
    # refinement follows the start unless told: random heads are trained, a closed-form start is kept
    assert TrainConfig(init="random").refined and not TrainConfig(init="ridge").refined
    assert TrainConfig(init="ridge", refine=True).refined
    with pytest.raises(TrainConfigError, match="refine=False needs a closed-form start"):
        TrainConfig(init="random", refine=False).validate()
    # Head_A follows the start unless told: trained from any other start, frozen only when asked
    assert not TrainConfig(init="ridge").head_a_frozen and TrainConfig(init="ridge", freeze_head_a=True).head_a_frozen
    assert not TrainConfig(freeze_head_a=False).head_a_frozen


def test_schedule_by_steps_unless_epochs_are_given():
    """The paper's 5 epochs are 25 steps on 2,500 captions; the default schedule runs at least min_steps."""
    c = TrainConfig()
    assert c.epochs is None and c.early_stopping and c.schedule_epochs == 5
    assert c.steps_budget(5) == c.min_steps                         # 2,500 captions at batch 512
    assert c.steps_budget(3906) == 5 * 3906                         # 2 M captions: the paper's 5 epochs
    assert c.evaluation_interval(5) == -(-c.min_steps // 40)
    assert TrainConfig(max_steps=100).steps_budget(5) == 100
    paper = TrainConfig(epochs=5)
    assert not paper.early_stopping and paper.steps_budget(5) == 25 and paper.evaluation_interval(5) == 5


def test_round_trip_through_json():
    c = TrainConfig(epochs=3, use_intra=False, retrieval_topk=64, max_grad_norm=None, device="cpu")
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_unknown_setting_is_refused():
    with pytest.raises(TrainConfigError, match="unknown training setting.*warmup"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "warmup": 10})


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"tau": 0}, "tau=0 must be > 0"),
    ({"epochs": 0}, "epochs=0 must be > 0"),
    ({"min_steps": 0}, "min_steps=0 must be > 0"),
    ({"patience": 0}, "patience=0 must be > 0"),
    ({"noise_variance": -1}, "noise_variance=-1 must be >= 0"),
    ({"heldout_fraction": 1.0}, "heldout_fraction=1.0 must be in"),
    ({"retrieval_topk": 0}, "retrieval_topk=0 must be >= 1"),
    ({"amp_dtype": "int8"}, "amp_dtype='int8'"),
    ({"use_text": False, "use_pseudo": False, "use_intra": False}, "no loss to train on"),
])
def test_bad_settings_are_named(change, message):
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**change).validate()


def test_options_not_given_keep_uclips_start():
    """`uclip train` with no option: TrainConfig's defaults, the closed form kept (no contrastive phase)."""
    c = TrainConfig.from_options(epochs=None, max_steps=None, lr=None, init=None, refine=None, batch_size=None)
    assert c == TrainConfig() and not c.refined


@pytest.mark.parametrize("given", [{"epochs": 2}, {"max_steps": 50}, {"lr": 1e-5}])
def test_a_schedule_or_learning_rate_asks_for_the_contrastive_phase(given):
    assert TrainConfig.from_options(**given).refined
    assert not TrainConfig.from_options(**given, refine=False).refined     # --closed-form-only still wins


def test_paper_puts_the_papers_start_in_place_and_the_options_named_still_apply_after_it():
    paper = TrainConfig.from_options(paper=True, epochs=5)
    assert {name: getattr(paper, name) for name in PAPER_START} == PAPER_START and paper.epochs == 5
    mixed = TrainConfig.from_options(paper=True, head_b="kernel", lr=5e-4, language_projection=True)
    assert (mixed.init, mixed.head_b, mixed.lr, mixed.language_projection, mixed.modality_projection) == \
        ("random", "kernel", 5e-4, True, False)


def test_switches_and_settings_reach_the_config():
    c = TrainConfig.from_options(use_text=False, use_noise=False, seed=3, device="cpu", retrieval_per_language=True,
                                 retrieval_topk=8, min_steps=10, patience=2, batch_size=64)
    assert (c.use_text, c.use_pseudo, c.use_noise, c.seed, c.device, c.retrieval_per_language, c.retrieval_topk,
            c.min_steps, c.patience, c.batch_size) == (False, True, False, 3, "cpu", True, 8, 10, 2, 64)


def test_an_unknown_option_is_named():
    with pytest.raises(TrainConfigError, match="unknown training setting.*warmup"):
        TrainConfig.from_options(warmup=10)

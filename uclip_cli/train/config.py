"""Every training setting of uclip's uCLIP trainer: the paper's losses and values, on uclip's start.

The losses, temperatures, perturbation, batch and optimiser follow method.md (AAAI 2026 uCLIP).
Where the paper is silent, the value is the one the authors' released code effectively ran with
(Hugging Face `Trainer` defaults): AdamW without weight decay, betas (0.9, 0.999), eps 1e-8,
gradient-norm clipping at 1.0, linear decay to 0 without warm-up.

One departure, the schedule: the paper's 5 epochs assume millions of captions; with a few thousand
they are a few dozen optimiser steps and the heads stay far from converged. By default (`epochs=None`)
training is scheduled by optimiser steps: 5 epochs' worth or `min_steps`, whichever is more, with the
learning rate decaying linearly to 0 over that budget, the held-out loss evaluated every `eval_every`
steps, and training stopped when it has not improved for `patience` evaluations (the best heads are
kept). `epochs=N` is the paper's exact setting: N epochs, decay over them, no early stopping.

The other departure, what the heads are and how they are fitted (issue 13; README "Does it learn on
real text encoders?", measured on both yardsticks with 3 seeds): Head_A removes the language
subspace (`language_projection`) and Head_B the modality subspace (`modality_projection`); the shared
space is the multilingual space itself (`init="ridge-to-multilingual"`), so Head_A stays there
(frozen); Head_B is a kernel regressor into it (`head_b="kernel"`), fitted in closed form on the
English captions, and kept as it is: on both yardsticks the paper's contrastive phase, run after
that fit, lowered foreign retrieval instead of raising it (`refine=True` still runs it, at a tenth
of the paper's learning rate, `lr=1e-4`). Random heads are always trained (`refine=None`: exactly
when the start is random). The paper's own start is PAPER_START: `TrainConfig(**PAPER_START,
epochs=5)` is the paper's exact method.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from uclip_cli.errors import UclipError


# how the heads start: random (the paper) or a closed-form alignment (train/closed_form.py)
INITS = ("random", "ridge", "procrustes", "ridge-to-multilingual")
# what Head_B is: the paper's MLP, or a kernel regressor (train/heads.py KernelHead)
HEAD_B_KINDS = ("mlp", "kernel")
# how Head_B is adapted to the image memory after its closed-form start (train/adapt.py; None: not at all)
ADAPTATIONS = ("mean", "coral", "coral-input", "self-learning")


# the paper's start and learning rate (uclip's defaults differ: see the module docstring)
PAPER_START = {"language_projection": False, "modality_projection": False, "init": "random", "freeze_head_a": False,
               "head_b": "mlp", "refine": True, "lr": 1e-3}


class TrainConfigError(UclipError, ValueError):
    """A training setting that cannot be used; the message names the setting."""


@dataclass
class TrainConfig:
    # heads
    d_shared: int = 512                  # shared embedding size
    hidden_mult: int = 2                 # hidden layer = hidden_mult * input dim
    # method
    tau: float = 0.01                    # SymNCE temperature (fixed, not learned)
    tau_retrieval: float = 0.01          # soft-retrieval softmax temperature (tau_1)
    noise_variance: float = 0.004        # sigma^2 of the Gaussian perturbation
    lambda_intra: float = 0.1
    use_text: bool = True                # L_text = SymNCE(z_K, z_I)
    use_pseudo: bool = True              # L_pseudo = SymNCE(z_k, z_v)
    use_intra: bool = True               # L_intra
    use_noise: bool = True               # perturbation of e_I, e_K, v, k
    # optimisation
    lr: float = 1e-4                     # AdamW, decays linearly to 0 over all steps (the paper: 1e-3, PAPER_START)
    weight_decay: float = 0.0            # authors' code: transformers TrainingArguments default
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0    # authors' code: transformers Trainer default; None = no clipping
    batch_size: int = 512
    epochs: int | None = None            # None: schedule by steps (below); N: exactly N epochs (the paper: 5)
    schedule_epochs: int = 5             # step schedule: budget = max(min_steps, schedule_epochs epochs of steps)
    min_steps: int = 1000                # step schedule: at least this many optimiser steps (README: measured)
    max_steps: int | None = None         # step schedule: at most this many (None: no cap)
    eval_every: int | None = None        # steps between held-out evaluations (None: budget / 40; one epoch with epochs=N)
    patience: int = 5                    # step schedule: stop after this many evaluations without improvement
    seed: int = 0
    heldout_fraction: float = 0.05       # captions kept out of training: held-out losses and early stopping
    heldout_max: int = 5000              # at most this many held-out captions
    # retrieval (targets computed once before training)
    retrieval_topk: int | None = None    # None = exact softmax over the whole memory
    retrieval_query_chunk: int = 1024    # queries per block
    retrieval_memory_chunk: int = 32768  # memory rows per block (RAM ~ 2 * 4 * query_chunk * memory_chunk bytes)
    # hardware
    device: str = "auto"                 # "auto" (cuda when torch sees one) | "cpu" | "cuda" | "cuda:N"
    amp: bool = True                     # autocast on GPU; ignored on CPU
    amp_dtype: str = "bfloat16"          # "bfloat16" | "float16" (float16 adds a gradient scaler)
    # beyond the paper (issue 13, train/head_setup.py); the paper's values are PAPER_START
    language_projection: bool = True     # Head_A removes the span of the language means (uclip_cli/subspaces.py)
    detect_languages: bool = True        # one foreign file (or no language known): its languages are detected
                                         # (subspaces.detect_languages); False: the whole file is one group
    modality_projection: bool = True     # Head_B removes the span of the CLIP text and image means (uclip_cli/subspaces.py)
    retrieval_per_language: bool = False # each anchor retrieves from one language's memory, languages balanced
    init: str = "ridge-to-multilingual"  # one of INITS: closed-form start (train/closed_form.py) or random
    freeze_head_a: bool | None = None    # Head_A keeps its closed-form start, only Head_B trains; None: exactly
                                         # when init is ridge-to-multilingual (Head_A = the multilingual space)
    head_b: str = "kernel"               # one of HEAD_B_KINDS: a kernel regressor or the paper's MLP
    refine: bool | None = None           # after the start, train with the paper's losses; False: the closed-form
                                         # start is the result; None: exactly when init is random
    adapt_head_b: str | None = None      # one of ADAPTATIONS: Head_B's closed-form start adapted to the image
                                         # memory, unpaired (train/adapt.py; issue 20); None: not adapted

    @property
    def sigma(self) -> float:
        return math.sqrt(self.noise_variance)

    def validate(self) -> "TrainConfig":
        positive = ("d_shared", "hidden_mult", "tau", "tau_retrieval", "lr", "batch_size", "schedule_epochs",
                    "min_steps", "patience", "heldout_max", "retrieval_query_chunk", "retrieval_memory_chunk")
        for name in positive:
            if not getattr(self, name) > 0:
                raise TrainConfigError(f"training setting {name}={getattr(self, name)!r} must be > 0")
        for name in ("epochs", "max_steps", "eval_every"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise TrainConfigError(f"training setting {name}={getattr(self, name)!r} must be > 0")
        for name in ("noise_variance", "lambda_intra", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise TrainConfigError(f"training setting {name}={getattr(self, name)!r} must be >= 0")
        if self.batch_size < 2:
            raise TrainConfigError("training setting batch_size must be >= 2 (contrastive loss and BatchNorm need pairs)")
        if not 0 <= self.heldout_fraction < 1:
            raise TrainConfigError(f"training setting heldout_fraction={self.heldout_fraction!r} must be in [0, 1)")
        if self.retrieval_topk is not None and self.retrieval_topk < 1:
            raise TrainConfigError(f"training setting retrieval_topk={self.retrieval_topk!r} must be >= 1 or None (exact)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainConfigError(f"training setting max_grad_norm={self.max_grad_norm!r} must be > 0 or None")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise TrainConfigError(f"training setting amp_dtype={self.amp_dtype!r} must be 'bfloat16' or 'float16'")
        if self.head_b not in HEAD_B_KINDS:
            raise TrainConfigError(f"training setting head_b={self.head_b!r} must be one of {', '.join(HEAD_B_KINDS)}")
        if self.init not in INITS:
            raise TrainConfigError(f"training setting init={self.init!r} must be one of {', '.join(INITS)}")
        if self.freeze_head_a and self.init == "random":
            raise TrainConfigError("training setting freeze_head_a needs a closed-form start (init ridge, procrustes "
                                   "or ridge-to-multilingual): a frozen random Head_A would stay random")
        if self.refine is False and self.init == "random":
            raise TrainConfigError("training setting refine=False needs a closed-form start (init ridge, procrustes or "
                                   "ridge-to-multilingual): random heads that are not trained stay random")
        if self.adapt_head_b is not None:
            if self.adapt_head_b not in ADAPTATIONS:
                raise TrainConfigError(f"training setting adapt_head_b={self.adapt_head_b!r} must be one of "
                                       f"{', '.join(ADAPTATIONS)} or None")
            if self.init == "random":
                raise TrainConfigError("training setting adapt_head_b adapts a closed-form start: it needs init ridge, "
                                       "procrustes or ridge-to-multilingual")
            if self.adapt_head_b in ADAPTATIONS[2:] and (self.init != "ridge-to-multilingual" or self.head_b != "kernel"):
                raise TrainConfigError(f"training setting adapt_head_b={self.adapt_head_b!r} refits the kernel Head_B in "
                                       "closed form: it needs init ridge-to-multilingual and head_b kernel")
        if not (self.use_text or self.use_pseudo or self.use_intra):
            raise TrainConfigError("use_text, use_pseudo and use_intra are all off: there is no loss to train on")
        return self

    def steps_budget(self, steps_per_epoch: int) -> int:
        """Optimiser steps this schedule runs at most, given the steps in one pass over the captions."""
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        budget = max(self.min_steps, self.schedule_epochs * steps_per_epoch)
        return min(budget, self.max_steps) if self.max_steps is not None else budget

    def evaluation_interval(self, steps_per_epoch: int) -> int:
        """Optimiser steps between held-out evaluations (and checkpoints)."""
        if self.eval_every is not None:
            return self.eval_every
        if self.epochs is not None:
            return steps_per_epoch
        return max(1, math.ceil(self.steps_budget(steps_per_epoch) / 40))

    @property
    def head_a_frozen(self) -> bool:
        """Whether Head_A stays as it starts (freeze_head_a, or by default with init ridge-to-multilingual)."""
        return self.freeze_head_a if self.freeze_head_a is not None else self.init == "ridge-to-multilingual"

    @property
    def refined(self) -> bool:
        """Whether the heads are trained with the paper's losses after their start (refine, or by default exactly
        when the start is random: a closed-form start is kept as it is)."""
        return self.refine if self.refine is not None else self.init == "random"

    @property
    def early_stopping(self) -> bool:
        return self.epochs is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, *, paper: bool = False, **options: Any) -> "TrainConfig":
        """The settings of one `uclip train` command line; an option given as None was not given.

        The rules a user reads in `uclip train --help`, in this order: the options given set their
        settings; `paper` then puts PAPER_START in place (the paper's heads, start and learning rate);
        the options PAPER_START names (--init, --head-b, --lr, the projections, --refine,
        --freeze-head-a) still apply after it; and a schedule or learning rate given without
        --refine/--closed-form-only (epochs, max_steps or lr) asks for the contrastive phase.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {', '.join(unknown)}")
        given = {name: value for name, value in options.items() if value is not None}
        config = cls(**{name: value for name, value in given.items() if name not in PAPER_START})
        for name, value in {**(PAPER_START if paper else {}),
                            **{n: v for n, v in given.items() if n in PAPER_START}}.items():
            setattr(config, name, value)
        if options.get("refine") is None and (options.get("epochs") or options.get("max_steps")
                                              or options.get("lr") is not None):
            config.refine = True
        return config

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {', '.join(unknown)}: written by another uclip version?")
        return cls(**d)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of a long job (feature extraction, retrieval, training)."""

    stage: str          # "encode" | "retrieve_image" | "retrieve_foreign" | "train" | "epoch" | "step"
    done: int           # units done so far
    total: int          # units in all
    rate: float         # units per second over the stage so far
    unit: str           # "items" | "rows" | "steps" | "epochs" | "evaluations" (the last two: a summary line)
    info: dict[str, Any] | None = None   # e.g. losses at the end of an epoch


ProgressFn = Callable[[ProgressEvent], None]

"""Every training setting of uclip's uCLIP trainer, with the paper's values as defaults.

Defaults follow method.md (AAAI 2026 uCLIP). Where the paper is silent, the value is the one the
authors' released code effectively ran with (Hugging Face `Trainer` defaults): AdamW without weight
decay, betas (0.9, 0.999), eps 1e-8, gradient-norm clipping at 1.0, linear decay to 0 without warm-up.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from uclip_cli.errors import UclipError


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
    lr: float = 1e-3                     # AdamW, decays linearly to 0 over all steps
    weight_decay: float = 0.0            # authors' code: transformers TrainingArguments default
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0    # authors' code: transformers Trainer default; None = no clipping
    batch_size: int = 512
    epochs: int = 5
    seed: int = 0
    heldout_fraction: float = 0.01       # captions kept out of training to report held-out losses
    # retrieval (targets computed once before training)
    retrieval_topk: int | None = None    # None = exact softmax over the whole memory
    retrieval_query_chunk: int = 1024    # queries per block
    retrieval_memory_chunk: int = 32768  # memory rows per block (RAM ~ 2 * 4 * query_chunk * memory_chunk bytes)
    # hardware
    device: str = "auto"                 # "auto" (cuda when torch sees one) | "cpu" | "cuda" | "cuda:N"
    amp: bool = True                     # autocast on GPU; ignored on CPU
    amp_dtype: str = "bfloat16"          # "bfloat16" | "float16" (float16 adds a gradient scaler)

    @property
    def sigma(self) -> float:
        return math.sqrt(self.noise_variance)

    def validate(self) -> "TrainConfig":
        positive = ("d_shared", "hidden_mult", "tau", "tau_retrieval", "lr", "batch_size", "epochs",
                    "retrieval_query_chunk", "retrieval_memory_chunk")
        for name in positive:
            if not getattr(self, name) > 0:
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
        if not (self.use_text or self.use_pseudo or self.use_intra):
            raise TrainConfigError("use_text, use_pseudo and use_intra are all off: there is no loss to train on")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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

    stage: str          # "encode" | "retrieve_image" | "retrieve_foreign" | "train" | "epoch"
    done: int           # units done so far
    total: int          # units in all
    rate: float         # units per second over the stage so far
    unit: str           # "items" | "rows" | "steps" | "epochs"
    info: dict[str, Any] | None = None   # e.g. losses at the end of an epoch


ProgressFn = Callable[[ProgressEvent], None]

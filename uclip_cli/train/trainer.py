"""uCLIP head training on precomputed frozen features (method.md, steps 2-6).

All four inputs are frozen features; the soft-retrieval targets (pseudo image v from the image
memory via e_I, pseudo foreign text k from the foreign memory via e_K) are computed once before
the first step. Each step then costs four small MLP passes and two B x B contrastive losses.

Schedule (config.py): by default a budget of optimiser steps (5 epochs' worth or `min_steps`,
whichever is more) with linear learning-rate decay over it; the held-out loss is evaluated every
`evaluation_interval` steps and training stops when it has not improved for `patience` evaluations,
keeping the best heads. With `epochs=N`, exactly N epochs (the paper's setting), the last heads.
Every result says why training stopped.

Reproducible and resumable: the held-out split, each epoch's shuffle and each step's noise come
from generators seeded by (seed, epoch) and (seed, step); a checkpoint at every evaluation holds the
heads, the best heads so far, the optimizer state (safetensors) and the scalars (json), so a run
resumed from any checkpoint equals an uninterrupted one. Runs live in `runs_dir` (runs.py): the same
command resumes its run, other settings or inputs start a new run; nothing is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from uclip_cli.filecache import sha256_file

from .config import ProgressEvent, ProgressFn, TrainConfig, TrainConfigError
from .data import TrainInputs, check_training_inputs, split_sizes
from .features import open_features
from .heads import UCLIPHeads
from .losses import LOSS_TERMS, perturb, uclip_losses
from .head_setup import build_heads, per_language_targets
from .retrieval import precompute_targets
from .runs import RESUMABLE_CHANGES, choose_run, finish_run  # noqa: F401 - RESUMABLE_CHANGES re-exported

TARGETS_FILE = "targets.safetensors"
MIN_IMPROVEMENT = 1e-4      # relative: a held-out loss counts as better when below best * (1 - this)


@dataclass
class EvalLog:
    step: int                           # optimiser steps done when evaluated
    epoch: float                        # passes over the training captions done (step / steps per epoch)
    train: dict[str, float]             # mean over the steps since the last evaluation (perturbed, BatchNorm in train mode)
    heldout: dict[str, float] | None    # held-out captions, no perturbation, BatchNorm in eval mode
    seconds: float
    steps_per_s: float


@dataclass
class TrainResult:
    heads: UCLIPHeads                   # on CPU, eval mode: the best heads (early stopping) or the last
    config: TrainConfig
    history: list[EvalLog]
    initial_heldout: dict[str, float] | None    # held-out losses of the untrained heads
    timings: dict[str, float]
    sizes: dict[str, int]               # captions, heldout_captions, image_memory, foreign_memory
    device: str
    resumed_from_step: int = 0
    retrieval_mass: dict[str, dict[str, float]] = field(default_factory=dict)  # top-k only
    start: dict[str, Any] = field(default_factory=dict)   # how the heads started (head_setup.build_heads)
    steps: int = 0                      # optimiser steps run (in all, across resumptions)
    total_steps: int = 0                # the schedule's budget
    steps_per_epoch: int = 0
    best_step: int | None = None        # step of the heads kept, when chosen by the held-out loss
    stop_reason: str = ""
    run_id: str | None = None
    run_message: str = ""

    def training_info(self) -> dict[str, Any]:
        """JSON summary for the bundle manifest and the heads' metadata."""
        return {
            "method": "uCLIP (Chung et al., AAAI 2026)",
            "config": self.config.to_dict(),
            "sizes": dict(self.sizes),
            "steps": self.steps,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "best_step": self.best_step,
            "stop_reason": self.stop_reason,
            "run": self.run_id,
            "evaluations": [{"step": e.step, "epoch": round(e.epoch, 4), "train": e.train, "heldout": e.heldout}
                            for e in self.history],
            "initial_heldout": self.initial_heldout,
            "retrieval_mass": self.retrieval_mass,
            "start": self.start,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "device": self.device,
        }


# ---------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError(f"device {name!r} asked for but torch sees no GPU: use --device cpu or auto")
    return device


def inputs_fingerprint(inputs: TrainInputs, samples: int = 257) -> str:
    """Identity of the four inputs: shapes and evenly spaced rows (cheap on a 2 M-row memmap), and the
    foreign memory's language groups when known."""
    h = hashlib.sha256()
    for a in inputs.arrays():
        h.update(repr(tuple(a.shape)).encode())
        rows = np.unique(np.linspace(0, a.shape[0] - 1, samples).astype(np.int64))
        h.update(np.ascontiguousarray(a[rows], dtype=np.float32).tobytes())
    if inputs.foreign_language is not None:
        h.update(json.dumps(inputs.foreign_languages).encode())
        h.update(np.ascontiguousarray(inputs.foreign_language, dtype=np.int16).tobytes())
    return h.hexdigest()[:32]


def _seed(config: TrainConfig, epoch: int, stream: int) -> int:
    return (config.seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63)


def _normalised_rows(array: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """array[rows] as an L2-normalised float32 tensor on device (one copy of the selected rows)."""
    return F.normalize(torch.from_numpy(np.asarray(array[rows], dtype=np.float32)), dim=-1).to(device)


def _autocast(config: TrainConfig, device: torch.device):
    if not (config.amp and device.type == "cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=_amp_dtype(config))


def _amp_dtype(config: TrainConfig) -> torch.dtype:
    if config.amp_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _project(heads: UCLIPHeads, e_I, e_K, v, k):
    return heads.head_a(e_K), heads.head_b(e_I), heads.head_a(k), heads.head_b(v)


# ---------------------------------------------------------------- retrieval targets (once)

def _compute_targets(arrays: TrainInputs, config: TrainConfig, device: torch.device,
                     progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, dict]:
    common = dict(query_chunk=config.retrieval_query_chunk, memory_chunk=config.retrieval_memory_chunk,
                  topk=config.retrieval_topk, device=device, progress=progress, return_mass=True)
    v, mass_v = precompute_targets(arrays.english_clip, arrays.image_memory, config.tau_retrieval,
                                   stage="retrieve_image", **common)
    if config.retrieval_per_language:
        k, mass_k = per_language_targets(arrays.english_multi, arrays.foreign_memory, arrays.foreign_language, config,
                                         stage="retrieve_foreign", **common)
    else:
        k, mass_k = precompute_targets(arrays.english_multi, arrays.foreign_memory, config.tau_retrieval,
                                       stage="retrieve_foreign", **common)
    mass = {}
    if config.retrieval_topk is not None:
        mass = {name: {"mean": float(m.mean()), "min": float(m.min())} for name, m in (("image", mass_v), ("foreign", mass_k))}
    return v, k, mass


def _retrieval_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings the retrieval targets depend on: tau_retrieval and every retrieval_* setting but block sizes."""
    return {k: v for k, v in config.to_dict().items()
            if (k == "tau_retrieval" or k.startswith("retrieval_")) and k not in RESUMABLE_CHANGES}


def _targets(arrays: TrainInputs, config: TrainConfig, device: torch.device, cache_dir: Path | None,
             fingerprint: str, progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Targets, reused from cache_dir when they were computed there from the same inputs and settings
    (one file: other inputs or settings replace it; it is derived data)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    key = json.dumps({"inputs": fingerprint, "retrieval": _retrieval_settings(config)}, sort_keys=True)
    path = cache_dir / TARGETS_FILE if cache_dir else None
    if path and path.is_file():
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                t = load_file(str(path))
                return t["image"], t["foreign"], json.loads(meta["mass"])
        except Exception:   # an unreadable cache is recomputed, not fatal
            pass
    v, k, mass = _compute_targets(arrays, config, device, progress)
    if path:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"image": v, "foreign": k}, str(tmp), metadata={"key": key, "mass": json.dumps(mass)})
        os.replace(tmp, path)
    return v, k, mass


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_GLOB = "step-*.json"


def _checkpoint_paths(directory: Path, step: int) -> tuple[Path, Path]:
    stem = directory / f"step-{step:09d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


@dataclass
class _LoopState:
    """Everything the loop carries from one evaluation to the next (saved in each checkpoint)."""

    step: int = 0
    history: list[EvalLog] = field(default_factory=list)
    initial_heldout: dict[str, float] | None = None
    best_loss: float | None = None
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None      # heads at best_step (CPU copies)
    bad_evaluations: int = 0
    stop_reason: str = ""

    def scalars(self) -> dict[str, Any]:
        return {"global_step": self.step, "history": [e.__dict__ for e in self.history],
                "initial_heldout": self.initial_heldout, "best_loss": self.best_loss, "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations, "stop_reason": self.stop_reason}


def save_checkpoint(directory: Path, *, state: _LoopState, heads: UCLIPHeads, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, config: TrainConfig, fingerprint: str) -> None:
    """step-N.safetensors (heads, best heads, optimizer tensors) then step-N.json (scalars, sha256 of the former)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors_path, json_path = _checkpoint_paths(directory, state.step)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    if state.best_state is not None:
        tensors.update({f"best/{k}": v.contiguous() for k, v in state.best_state.items()})
    opt = optimizer.state_dict()
    for pid, values in opt["state"].items():
        for name, value in values.items():
            tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous()
    tmp = tensors_path.with_name(f".{tensors_path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, tensors_path)
    record = {
        **state.scalars(),
        "config": config.to_dict(),
        "inputs_fingerprint": fingerprint,
        "rng": {"seed": config.seed},   # every generator is reseeded from (seed, epoch) or (seed, step)
        "optimizer_param_groups": opt["param_groups"],
        "scaler": scaler.state_dict() if scaler else None,
        "tensors_sha256": sha256_file(tensors_path),
    }
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, json_path)
    for old in directory.glob(CHECKPOINT_GLOB):          # keep only the newest complete checkpoint
        if old != json_path:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)


def load_latest_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Newest checkpoint whose tensors file is complete (matches the sha256 its json records)."""
    from safetensors.torch import load_file

    if not directory.is_dir():
        return None
    for json_path in sorted(directory.glob(CHECKPOINT_GLOB), reverse=True):
        try:
            record = json.loads(json_path.read_text(encoding="utf-8"))
            tensors_path = json_path.with_suffix(".safetensors")
            if tensors_path.is_file() and sha256_file(tensors_path) == record["tensors_sha256"]:
                return record, load_file(str(tensors_path))
        except (OSError, ValueError, KeyError):
            continue
    return None


def _restore(record: dict, tensors: dict[str, torch.Tensor], heads: UCLIPHeads, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, device: torch.device) -> _LoopState:
    heads.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value if name == "step" else value.to(device)
    groups = record["optimizer_param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scaler and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return _LoopState(step=record["global_step"], history=[EvalLog(**e) for e in record["history"]],
                      initial_heldout=record["initial_heldout"], best_loss=record["best_loss"],
                      best_step=record["best_step"], best_state=best, bad_evaluations=record["bad_evaluations"],
                      stop_reason=record.get("stop_reason", ""))


# ---------------------------------------------------------------- steps

@torch.no_grad()
def evaluate_losses(heads: UCLIPHeads, data: tuple[torch.Tensor, ...], config: TrainConfig,
                    device: torch.device) -> dict[str, float]:
    """Each loss term on data = (e_I, e_K, v, k), no perturbation, BatchNorm in eval mode.

    Batches of batch_size rows (a last batch of fewer than 2 rows joins the one before), mean
    weighted by batch size; with fewer rows than a batch the contrastive terms see fewer negatives.
    """
    was_training = heads.training
    heads.eval()
    n = data[0].shape[0]
    bounds = list(range(0, n, config.batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        bounds.pop(-2)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    for a, b in zip(bounds[:-1], bounds[1:]):
        with _autocast(config, device):
            z = _project(heads, *(t[a:b] for t in data))
        for name, value in uclip_losses(*z, config).items():
            sums[name] += float(value) * (b - a)
    heads.train(was_training)
    return {name: s / n for name, s in sums.items()}


class _Stepper:
    """One optimisation step: perturb, project, losses, backward, clip, AdamW, linear learning-rate decay."""

    def __init__(self, heads: UCLIPHeads, config: TrainConfig, device: torch.device, total_steps: int):
        self.heads, self.config, self.device, self.total_steps = heads, config, device, total_steps
        self.optimizer = torch.optim.AdamW(
            heads.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps, weight_decay=config.weight_decay,
        )
        fp16 = config.amp and device.type == "cuda" and _amp_dtype(config) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def step(self, global_step: int, batch: list[torch.Tensor], noise: torch.Generator) -> torch.Tensor:
        config = self.config
        if config.use_noise:
            batch = [perturb(x, config.sigma, noise) for x in batch]
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * (1.0 - global_step / self.total_steps)
        with _autocast(config, self.device):
            z = _project(self.heads, *batch)
        terms = uclip_losses(*z, config)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(terms["total"]).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            terms["total"].backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return torch.stack([terms[name].detach() for name in LOSS_TERMS])


class _Batches:
    """The captions of global step g: epoch g // steps_per_epoch's seeded shuffle, slice g % steps_per_epoch
    (last partial batch of an epoch dropped); the noise of step g from its own seeded generator."""

    def __init__(self, config: TrainConfig, device: torch.device, n: int, steps_per_epoch: int):
        self.config, self.device, self.n, self.steps_per_epoch = config, device, n, steps_per_epoch
        self._epoch, self._order = -1, None

    def rows(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_seed(self.config, epoch, 1))
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator).to(self.device)
        b = self.config.batch_size
        return self._order[i * b:(i + 1) * b]

    def noise(self, step: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_seed(self.config, step, 2))


def _train_steps(stepper: _Stepper, data: tuple[torch.Tensor, ...], batches: _Batches, first: int, count: int,
                 progress: ProgressFn | None) -> tuple[dict[str, float], float]:
    """Steps first .. first+count-1; returns the mean losses over them and the seconds they took."""
    stepper.heads.train()
    sums = torch.zeros(len(LOSS_TERMS), device=stepper.device)
    started = last_report = time.perf_counter()
    for step in range(first, first + count):
        idx = batches.rows(step)
        sums += stepper.step(step, [t[idx] for t in data], batches.noise(step))
        now = time.perf_counter()
        if progress and (now - last_report > 0.5 or step == first + count - 1):
            last_report = now
            progress(ProgressEvent("train", step + 1, stepper.total_steps, (step + 1 - first) / (now - started), "steps"))
    means = (sums / count).tolist()          # waits for the device to finish the steps
    return dict(zip(LOSS_TERMS, means)), time.perf_counter() - started


def _record_evaluation(state: _LoopState, heads: UCLIPHeads, heldout: dict[str, float] | None, config: TrainConfig) -> None:
    """Track the best held-out loss (and its heads) and the evaluations since it improved."""
    if heldout is None:
        return
    loss = heldout["total"]
    if state.best_loss is None or loss < state.best_loss - MIN_IMPROVEMENT * abs(state.best_loss):
        state.best_loss, state.best_step, state.bad_evaluations = loss, state.step, 0
        state.best_state = {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()}
    else:
        state.bad_evaluations += 1


def _stop_reason(state: _LoopState, config: TrainConfig, total_steps: int, steps_per_epoch: int, interval: int,
                 has_heldout: bool) -> str:
    """Why the loop stops after this evaluation, or "" to go on."""
    epochs = f"{state.step / steps_per_epoch:.1f} epochs"
    if config.early_stopping and has_heldout and state.bad_evaluations >= config.patience:
        return (f"held-out loss did not improve for {config.patience} evaluations ({config.patience * interval} steps): "
                f"stopped at step {state.step} of {total_steps} ({epochs}); kept the heads of step {state.best_step} "
                f"(held-out loss {state.best_loss:.4f})")
    if state.step < total_steps:
        return ""
    if not config.early_stopping:
        return f"finished the {config.epochs}-epoch schedule ({total_steps} steps), as --epochs asked"
    if not has_heldout:
        return (f"ran the whole step budget ({total_steps} steps, {epochs}); no held-out captions to stop early on "
                f"(too few captions for heldout_fraction {config.heldout_fraction})")
    kept = ("the held-out loss was still improving" if state.best_step == state.step
            else f"kept the heads of step {state.best_step} (best held-out loss {state.best_loss:.4f})")
    return f"ran the whole step budget ({total_steps} steps, {epochs}); {kept}"


# ---------------------------------------------------------------- a run

@dataclass(frozen=True)
class _Split:
    """Which captions train and which are held out (seeded by config.seed), and the sizes the result reports."""

    train_idx: np.ndarray
    held_idx: np.ndarray
    sizes: dict[str, int]

    @classmethod
    def of(cls, inputs: TrainInputs, config: TrainConfig) -> _Split:
        n = inputs.english_clip.shape[0]
        n_train, n_held = split_sizes(n, config)
        order = np.random.default_rng(config.seed).permutation(n)
        sizes = {"captions": n_train, "heldout_captions": n_held,
                 "image_memory": int(inputs.image_memory.shape[0]), "foreign_memory": int(inputs.foreign_memory.shape[0])}
        return cls(np.sort(order[n_held:]), np.sort(order[:n_held]), sizes)


@dataclass(frozen=True)
class _Schedule:
    """Steps per epoch, the step budget and how often the held-out loss is evaluated (config.py)."""

    steps_per_epoch: int
    total_steps: int
    interval: int

    @classmethod
    def of(cls, config: TrainConfig, n_train: int) -> _Schedule:
        steps_per_epoch = n_train // config.batch_size
        return cls(steps_per_epoch, config.steps_budget(steps_per_epoch), config.evaluation_interval(steps_per_epoch))


def _closed_form_result(inputs: TrainInputs, config: TrainConfig, split: _Split, run: Any, device: torch.device,
                        started: float, log: Callable[[str], None]) -> TrainResult:
    """The closed-form start is the result: no targets, no steps (it is refitted in seconds)."""
    if run and run.message:
        log(run.message)
    log(f"fitting the heads in closed form on {len(split.train_idx):,} captions (about a minute per 50,000 on two cores)")
    torch.manual_seed(config.seed)
    heads, start_info = build_heads(inputs, config, anchor_rows=split.train_idx, log=log)
    stop = "the closed-form start is kept (no contrastive refinement: --refine trains with the paper's losses)"
    if run:
        finish_run(run.path, step=0, best_step=None, stop_reason=stop)
    return TrainResult(heads.cpu().eval(), config, [], None, {"total_s": time.perf_counter() - started}, split.sizes,
                       str(device), stop_reason=stop, start=start_info, run_id=run.run_id if run else None,
                       run_message=run.message if run else "")


class _Refinement:
    """The contrastive refinement of one run: its heads, data and schedule, and the loop's state, which is
    checkpointed at every evaluation (`run`: runs.py's chosen run, or None without a runs folder)."""

    def __init__(self, heads: UCLIPHeads, config: TrainConfig, device: torch.device, schedule: _Schedule,
                 data: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None], *, run: Any,
                 fingerprint: str, progress: ProgressFn | None):
        self.heads, self.config, self.device, self.schedule = heads, config, device, schedule
        self.train_data, self.held_data = data
        self.run, self.fingerprint, self.progress = run, fingerprint, progress
        self.stepper = _Stepper(heads, config, device, total_steps=schedule.total_steps)
        self.train_s = self.eval_s = 0.0

    def start(self, resume: Any) -> tuple[_LoopState, str]:
        """The loop's state, restored from the run's latest checkpoint or fresh, and what to tell the user."""
        if resume:
            state = _restore(*resume, self.heads, self.stepper.optimizer, self.stepper.scaler, self.device)
            message = (f"run {self.run.run_id} had finished at step {state.step}: nothing to train, its heads are used"
                       if state.stop_reason else
                       f"resuming run {self.run.run_id} from step {state.step} of {self.schedule.total_steps} "
                       f"(epoch {state.step / self.schedule.steps_per_epoch:.1f})")
            return state, message
        initial = evaluate_losses(self.heads, self.held_data, self.config, self.device) if self.held_data else None
        return _LoopState(initial_heldout=initial), self.run.message if self.run else ""

    def loop(self, state: _LoopState) -> None:
        """Train and evaluate, interval by interval, until state.stop_reason is set."""
        batches = _Batches(self.config, self.device, self.train_data[0].shape[0], self.schedule.steps_per_epoch)
        while not state.stop_reason:
            self._interval(state, batches)

    def _interval(self, state: _LoopState, batches: _Batches) -> None:
        config, schedule, heads = self.config, self.schedule, self.heads
        count = min(schedule.interval, schedule.total_steps - state.step)
        train_losses, seconds = _train_steps(self.stepper, self.train_data, batches, state.step, count, self.progress)
        self.train_s += seconds
        state.step += count
        t = time.perf_counter()
        heldout = evaluate_losses(heads, self.held_data, config, self.device) if self.held_data else None
        self.eval_s += time.perf_counter() - t
        state.history.append(EvalLog(state.step, state.step / schedule.steps_per_epoch, train_losses, heldout, seconds,
                                     count / seconds))
        _record_evaluation(state, heads, heldout, config)
        state.stop_reason = _stop_reason(state, config, schedule.total_steps, schedule.steps_per_epoch,
                                         schedule.interval, self.held_data is not None)
        if self.run:
            save_checkpoint(self.run.path, state=state, heads=heads, optimizer=self.stepper.optimizer,
                            scaler=self.stepper.scaler, config=config, fingerprint=self.fingerprint)
        if self.progress:
            info = {"train": train_losses, "heldout": heldout}
            self.progress(ProgressEvent("epoch", state.step // schedule.steps_per_epoch, config.epochs, count / seconds,
                                        "epochs", info=info)
                          if not config.early_stopping else
                          ProgressEvent("step", state.step, schedule.total_steps, count / seconds, "evaluations",
                                        info=info))

    def finish(self, state: _LoopState) -> int | None:
        """Keep the best heads (early stopping) and close the run; returns the step of the heads kept, if chosen."""
        keep_best = self.config.early_stopping and state.best_state is not None
        if keep_best:
            self.heads.load_state_dict(state.best_state)
        best_step = state.best_step if keep_best else None
        if self.run:
            finish_run(self.run.path, step=state.step, best_step=best_step, stop_reason=state.stop_reason)
        return best_step

    def timings(self, steps_run: int, retrieval_s: float, started: float) -> dict[str, float]:
        train_s = self.train_s
        return {
            "retrieval_s": retrieval_s,
            "train_s": train_s,
            "eval_s": self.eval_s,
            "total_s": time.perf_counter() - started,
            "steps_per_s": steps_run / train_s if train_s else 0.0,
            "captions_per_s": steps_run * self.config.batch_size / train_s if train_s else 0.0,
        }


# ---------------------------------------------------------------- entry point

def train_heads(inputs: TrainInputs, config: TrainConfig, *, runs_dir: Path | None = None,
                progress: ProgressFn | None = None, dims: dict[str, int] | None = None,
                log: Callable[[str], None] = lambda m: None) -> TrainResult:
    """Train Head_A and Head_B on the frozen features of `inputs` (data.TrainInputs).

    Every input is checked before anything else runs (TrainInputError). With runs_dir, a checkpoint
    is written at every evaluation, the soft-retrieval targets are cached there, and an identical
    earlier run is resumed (or reused when it had finished); log says which run and why.
    dims: the widths the bundle's encoders give, {"clip": d_v, "multilingual": d_m}.
    """
    started = time.perf_counter()
    config.validate()
    inputs = check_training_inputs(inputs, config, dims=dims)
    device = resolve_device(config.device)
    split = _Split.of(inputs, config)
    fingerprint = inputs_fingerprint(inputs)
    run = choose_run(Path(runs_dir), config, fingerprint) if runs_dir else None
    if not config.refined:
        return _closed_form_result(inputs, config, split, run, device, started, log)
    resume = load_latest_checkpoint(run.path) if run else None

    t = time.perf_counter()
    v, k, mass = _targets(inputs, config, device, Path(runs_dir) if runs_dir else None, fingerprint, progress)
    retrieval_s = time.perf_counter() - t
    sources = (inputs.english_clip, inputs.english_multi, v, k)
    train_data = tuple(_normalised_rows(a, split.train_idx, device) for a in sources)
    held_data = tuple(_normalised_rows(a, split.held_idx, device) for a in sources) if len(split.held_idx) else None
    del sources, v, k

    torch.manual_seed(config.seed)
    heads, start_info = build_heads(inputs, config, anchor_rows=split.train_idx, log=log)
    heads = heads.to(device)
    schedule = _Schedule.of(config, split.sizes["captions"])
    refinement = _Refinement(heads, config, device, schedule, (train_data, held_data), run=run,
                             fingerprint=fingerprint, progress=progress)
    state, message = refinement.start(resume)
    if message:
        log(message)
    resumed_from = state.step
    refinement.loop(state)
    best_step = refinement.finish(state)
    return TrainResult(heads.cpu().eval(), config, state.history, state.initial_heldout,
                       refinement.timings(state.step - resumed_from, retrieval_s, started), split.sizes, str(device),
                       resumed_from, mass, steps=state.step, total_steps=schedule.total_steps,
                       steps_per_epoch=schedule.steps_per_epoch, best_step=best_step, stop_reason=state.stop_reason,
                       run_id=run.run_id if run else None, run_message=message, start=start_info)


def train_from_feature_files(english_clip: Path, english_multi: Path, image_memory: Path, foreign_memory: Path,
                             config: TrainConfig, *, dims: dict[str, int] | None = None,
                             runs_dir: Path | None = None, progress: ProgressFn | None = None) -> TrainResult:
    """train_heads on four .npy feature files (memory-mapped); errors name the file at fault.

    dims: the widths the bundle's encoders give, {"clip": d_v, "multilingual": d_m}.
    """
    paths = {"english_clip": english_clip, "english_multi": english_multi,
             "image_memory": image_memory, "foreign_memory": foreign_memory}
    arrays = {name: open_features(path, check=False) for name, path in paths.items()}   # train_heads checks them
    inputs = TrainInputs(**arrays, names={name: str(path) for name, path in paths.items()})
    return train_heads(inputs, config, runs_dir=runs_dir, progress=progress, dims=dims)

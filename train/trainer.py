"""uCLIP head training on precomputed frozen features (method.md, steps 2-6).

All four inputs are frozen features; the soft-retrieval targets (pseudo image v from the image
memory via e_I, pseudo foreign text k from the foreign memory via e_K) are computed once before
the first epoch. Each step then costs four small MLP passes and two B x B contrastive losses.

Reproducible and resumable: the held-out split, each epoch's shuffle and each epoch's noise come
from generators seeded by (seed, epoch); a checkpoint after every epoch holds the heads, the
optimizer state (safetensors) and the scalars (json), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import ProgressEvent, ProgressFn, TrainConfig, TrainConfigError
from .data import TrainInputError, TrainingArrays, check_training_arrays, split_sizes
from .features import open_features
from .heads import UCLIPHeads
from .losses import LOSS_TERMS, perturb, uclip_losses
from .retrieval import precompute_targets

TARGETS_FILE = "targets.safetensors"
# settings that do not change what is computed: a resumed run may change them
RESUMABLE_CHANGES = ("device", "amp", "amp_dtype", "retrieval_query_chunk", "retrieval_memory_chunk")


@dataclass
class EpochLog:
    epoch: int                          # 1-based
    train: dict[str, float]             # mean over the epoch's steps (perturbed inputs, BatchNorm in train mode)
    heldout: dict[str, float] | None    # held-out captions, no perturbation, BatchNorm in eval mode
    seconds: float
    steps_per_s: float


@dataclass
class TrainResult:
    heads: UCLIPHeads                   # on CPU, eval mode
    config: TrainConfig
    history: list[EpochLog]
    initial_heldout: dict[str, float] | None    # held-out losses of the untrained heads
    timings: dict[str, float]
    sizes: dict[str, int]               # captions, heldout_captions, image_memory, foreign_memory
    device: str
    resumed_from_epoch: int = 0
    retrieval_mass: dict[str, dict[str, float]] = field(default_factory=dict)  # top-k only

    def training_info(self) -> dict[str, Any]:
        """JSON summary for the bundle manifest and the heads' metadata."""
        return {
            "method": "uCLIP (Chung et al., AAAI 2026)",
            "config": self.config.to_dict(),
            "sizes": dict(self.sizes),
            "epochs": [{"epoch": e.epoch, "train": e.train, "heldout": e.heldout} for e in self.history],
            "initial_heldout": self.initial_heldout,
            "retrieval_mass": self.retrieval_mass,
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


def inputs_fingerprint(arrays: TrainingArrays, samples: int = 257) -> str:
    """Identity of the four inputs: shapes and evenly spaced rows (cheap on a 2 M-row memmap)."""
    h = hashlib.sha256()
    for a in (arrays.english_clip, arrays.english_multi, arrays.image_memory, arrays.foreign_memory):
        h.update(repr(tuple(a.shape)).encode())
        rows = np.unique(np.linspace(0, a.shape[0] - 1, samples).astype(np.int64))
        h.update(np.ascontiguousarray(a[rows], dtype=np.float32).tobytes())
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

def _compute_targets(arrays: TrainingArrays, config: TrainConfig, device: torch.device,
                     progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, dict]:
    common = dict(query_chunk=config.retrieval_query_chunk, memory_chunk=config.retrieval_memory_chunk,
                  topk=config.retrieval_topk, device=device, progress=progress, return_mass=True)
    v, mass_v = precompute_targets(arrays.english_clip, arrays.image_memory, config.tau_retrieval,
                                   stage="retrieve_image", **common)
    k, mass_k = precompute_targets(arrays.english_multi, arrays.foreign_memory, config.tau_retrieval,
                                   stage="retrieve_foreign", **common)
    mass = {}
    if config.retrieval_topk is not None:
        mass = {name: {"mean": float(m.mean()), "min": float(m.min())} for name, m in (("image", mass_v), ("foreign", mass_k))}
    return v, k, mass


def _targets(arrays: TrainingArrays, config: TrainConfig, device: torch.device, checkpoint_dir: Path | None,
             fingerprint: str, progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Targets, reused from checkpoint_dir when they were computed there from the same inputs and settings."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    key = json.dumps({"inputs": fingerprint, "tau_retrieval": config.tau_retrieval, "topk": config.retrieval_topk})
    path = checkpoint_dir / TARGETS_FILE if checkpoint_dir else None
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

def _checkpoint_paths(directory: Path, epoch: int) -> tuple[Path, Path]:
    stem = directory / f"epoch-{epoch:04d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(directory: Path, *, epoch: int, step: int, heads: UCLIPHeads, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, config: TrainConfig, fingerprint: str,
                    history: list[EpochLog], initial_heldout: dict | None) -> None:
    """epoch-NNNN.safetensors (heads + optimizer tensors) then epoch-NNNN.json (scalars, sha256 of the former)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors_path, json_path = _checkpoint_paths(directory, epoch)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous()
    tmp = tensors_path.with_name(f".{tensors_path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, tensors_path)
    record = {
        "epoch": epoch,
        "global_step": step,
        "config": config.to_dict(),
        "inputs_fingerprint": fingerprint,
        "rng": {"seed": config.seed, "next_epoch": epoch},   # every generator is reseeded from (seed, epoch)
        "optimizer_param_groups": opt["param_groups"],
        "scaler": scaler.state_dict() if scaler else None,
        "history": [e.__dict__ for e in history],
        "initial_heldout": initial_heldout,
        "tensors_sha256": _sha256(tensors_path),
    }
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, json_path)
    for old in range(epoch - 1, 0, -1):          # keep only the newest complete checkpoint
        for p in _checkpoint_paths(directory, old):
            p.unlink(missing_ok=True)


def load_latest_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Newest checkpoint whose tensors file is complete (matches the sha256 its json records)."""
    from safetensors.torch import load_file

    if not directory.is_dir():
        return None
    for json_path in sorted(directory.glob("epoch-*.json"), reverse=True):
        try:
            record = json.loads(json_path.read_text(encoding="utf-8"))
            tensors_path = json_path.with_suffix(".safetensors")
            if tensors_path.is_file() and _sha256(tensors_path) == record["tensors_sha256"]:
                return record, load_file(str(tensors_path))
        except (OSError, ValueError, KeyError):
            continue
    return None


def _check_resumable(record: dict, config: TrainConfig, fingerprint: str, directory: Path) -> None:
    saved = {k: v for k, v in record["config"].items() if k not in RESUMABLE_CHANGES}
    mine = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if changed:
        raise TrainInputError(
            f"{directory}: its checkpoint was trained with other settings ({', '.join(changed)}): "
            "use the same settings to resume, or another checkpoint directory"
        )
    if record["inputs_fingerprint"] != fingerprint:
        raise TrainInputError(
            f"{directory}: its checkpoint was trained on other feature files: use the same inputs to resume, "
            "or another checkpoint directory"
        )


def _restore(record: dict, tensors: dict[str, torch.Tensor], heads: UCLIPHeads, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, device: torch.device) -> None:
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


# ---------------------------------------------------------------- epochs

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


def _train_epoch(stepper: _Stepper, data: tuple[torch.Tensor, ...], epoch: int, first_step: int,
                 progress: ProgressFn | None) -> tuple[dict[str, float], int, float]:
    """One pass over the training captions (shuffled, last partial batch dropped); returns mean losses."""
    config, device = stepper.config, stepper.device
    n = data[0].shape[0]
    steps = n // config.batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(config, epoch, 1))).to(device)
    noise = torch.Generator(device=device).manual_seed(_seed(config, epoch, 2))
    stepper.heads.train()
    sums = torch.zeros(len(LOSS_TERMS), device=device)
    started = last_report = time.perf_counter()
    for i in range(steps):
        idx = order[i * config.batch_size:(i + 1) * config.batch_size]
        sums += stepper.step(first_step + i, [t[idx] for t in data], noise)
        now = time.perf_counter()
        if progress and (now - last_report > 0.5 or i == steps - 1):
            last_report = now
            progress(ProgressEvent("train", first_step + i + 1, stepper.total_steps, (i + 1) / (now - started), "steps"))
    means = (sums / steps).tolist()          # waits for the device to finish the epoch
    seconds = time.perf_counter() - started
    return dict(zip(LOSS_TERMS, means)), steps, seconds


# ---------------------------------------------------------------- entry point

def train_heads(english_clip: np.ndarray, english_multi: np.ndarray, image_memory: np.ndarray,
                foreign_memory: np.ndarray, config: TrainConfig, *, checkpoint_dir: Path | None = None,
                progress: ProgressFn | None = None, names: dict[str, str] | None = None,
                dims: dict[str, int] | None = None) -> TrainResult:
    """Train Head_A and Head_B on frozen features.

    english_clip [N, d_clip] and english_multi [N, d_multi]: the same N English captions through
    the CLIP text encoder and the multilingual encoder; image_memory [M1, d_clip] and
    foreign_memory [M2, d_multi]: unpaired memories. Arrays may be memory-mapped. Every input is
    checked before anything else runs (TrainInputError). With checkpoint_dir, a checkpoint is
    written after every epoch and an existing one is resumed.
    """
    started = time.perf_counter()
    config.validate()
    arrays = check_training_arrays(english_clip, english_multi, image_memory, foreign_memory, config,
                                   names=names, dims=dims)
    device = resolve_device(config.device)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if checkpoint_dir:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = inputs_fingerprint(arrays)
    resume = load_latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if resume:
        _check_resumable(resume[0], config, fingerprint, checkpoint_dir)

    t = time.perf_counter()
    v, k, mass = _targets(arrays, config, device, checkpoint_dir, fingerprint, progress)
    retrieval_s = time.perf_counter() - t

    n = english_clip.shape[0]
    n_train, n_held = split_sizes(n, config)
    order = np.random.default_rng(config.seed).permutation(n)
    held_idx, train_idx = np.sort(order[:n_held]), np.sort(order[n_held:])
    sources = (english_clip, english_multi, v, k)
    train_data = tuple(_normalised_rows(a, train_idx, device) for a in sources)
    held_data = tuple(_normalised_rows(a, held_idx, device) for a in sources) if n_held else None
    del sources, v, k

    torch.manual_seed(config.seed)
    heads = UCLIPHeads(arrays.d_multi, arrays.d_clip, config.d_shared, config.hidden_mult).to(device)
    steps_per_epoch = n_train // config.batch_size
    stepper = _Stepper(heads, config, device, total_steps=steps_per_epoch * config.epochs)

    history: list[EpochLog] = []
    start_epoch = 0
    if resume:
        record, tensors = resume
        _restore(record, tensors, heads, stepper.optimizer, stepper.scaler, device)
        start_epoch = record["epoch"]
        history = [EpochLog(**e) for e in record["history"]]
        initial_heldout = record["initial_heldout"]
    else:
        initial_heldout = evaluate_losses(heads, held_data, config, device) if held_data else None

    train_s = eval_s = 0.0
    steps_run = 0
    for epoch in range(start_epoch, config.epochs):
        train_losses, steps, seconds = _train_epoch(stepper, train_data, epoch, epoch * steps_per_epoch, progress)
        train_s, steps_run = train_s + seconds, steps_run + steps
        t = time.perf_counter()
        heldout = evaluate_losses(heads, held_data, config, device) if held_data else None
        eval_s += time.perf_counter() - t
        history.append(EpochLog(epoch + 1, train_losses, heldout, seconds, steps / seconds))
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, heads=heads,
                            optimizer=stepper.optimizer, scaler=stepper.scaler, config=config,
                            fingerprint=fingerprint, history=history, initial_heldout=initial_heldout)
        if progress:
            progress(ProgressEvent("epoch", epoch + 1, config.epochs, steps / seconds, "epochs",
                                   info={"train": train_losses, "heldout": heldout}))

    timings = {
        "retrieval_s": retrieval_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - started,
        "steps_per_s": steps_run / train_s if train_s else 0.0,
        "captions_per_s": steps_run * config.batch_size / train_s if train_s else 0.0,
    }
    sizes = {"captions": n_train, "heldout_captions": n_held,
             "image_memory": int(image_memory.shape[0]), "foreign_memory": int(foreign_memory.shape[0])}
    return TrainResult(heads.cpu().eval(), config, history, initial_heldout, timings, sizes, str(device),
                       start_epoch, mass)


def train_from_feature_files(english_clip: Path, english_multi: Path, image_memory: Path, foreign_memory: Path,
                             config: TrainConfig, *, dims: dict[str, int] | None = None,
                             checkpoint_dir: Path | None = None, progress: ProgressFn | None = None) -> TrainResult:
    """train_heads on four .npy feature files (memory-mapped); errors name the file at fault.

    dims: the widths the bundle's encoders give, {"clip": d_v, "multilingual": d_m}.
    """
    paths = {"english_clip": english_clip, "english_multi": english_multi,
             "image_memory": image_memory, "foreign_memory": foreign_memory}
    arrays = {name: open_features(path, check=False) for name, path in paths.items()}   # train_heads checks them
    return train_heads(**arrays, config=config, checkpoint_dir=checkpoint_dir, progress=progress,
                       names={name: str(path) for name, path in paths.items()}, dims=dims)

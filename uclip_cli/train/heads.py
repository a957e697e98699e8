"""The two trained uCLIP heads: weights as safetensors, graphs as ONNX, written into a bundle.

Head_A maps the multilingual text space (d_multi) and Head_B the CLIP space (d_clip) into the
shared space: Linear(d, m*d) -> BatchNorm1d -> ReLU -> Linear(m*d, d_shared) -> L2-normalise.

A head may first remove a subspace from its input (`removed`, an orthonormal basis Q [d, r]):
x -> normalise(x - x Q Qᵀ). Head_A uses it to project out the directions that carry language
identity in the multilingual space (uclip_cli/subspaces.py), Head_B the directions that carry the
modality (image or text) in the CLIP space (uclip_cli/subspaces.py). Q is a buffer of the head, not a setting
of the caller: it is saved with the weights and exported inside head_a.onnx, so training and
every query apply the same projection and a query needs no language code.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uclip_cli.errors import UclipError
from uclip_cli.bundle import HEAD_A, HEAD_B, HEADS_WEIGHTS, install_files, read_manifest
from uclip_cli.sessions import SessionFactory

from .config import HEAD_B_KINDS, TrainConfig

HEADS_FORMAT = "uclip-heads"
HEADS_FORMAT_VERSION = 1
ONNX_INPUT = "features"
ONNX_OUTPUT = "embeddings"


class HeadsError(UclipError):
    """A heads file or head export that cannot be used; the message names the file."""


def remove_subspace(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """normalise(x - x Q Qᵀ) for an orthonormal basis Q [d, r] of the subspace to remove."""
    return F.normalize(x - (x @ basis) @ basis.T, dim=-1)


class Head(nn.Module):
    """What every head shares: its input width, the subspace it removes from its input, freezing."""

    def __init__(self, d_in: int, removed_directions: int = 0):
        super().__init__()
        self._d_in = d_in
        if removed_directions:
            self.register_buffer("removed", torch.zeros(d_in, removed_directions))
        else:
            self.removed = None
        self.frozen = False

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def removed_directions(self) -> int:
        return 0 if self.removed is None else self.removed.shape[1]

    def set_removed(self, basis: torch.Tensor) -> None:
        """Use the orthonormal basis [d_in, r] as the removed subspace (its width must match the head's)."""
        if self.removed is None or tuple(basis.shape) != tuple(self.removed.shape):
            raise ValueError(f"removed subspace {tuple(basis.shape)} does not fit this head "
                             f"({self.d_in} x {self.removed_directions})")
        with torch.no_grad():
            self.removed.copy_(basis)

    def freeze(self) -> None:
        """Keep this head as it is while the other trains: no gradients, and BatchNorm stays in eval mode
        (its running statistics are part of the function, so train() must not update them)."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Head":
        return super().train(mode and not self.frozen)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input after its removed subspace is projected out (x itself when there is none)."""
        return x if self.removed is None else remove_subspace(x, self.removed.to(x.dtype))


class ProjectionHead(Head):
    """The paper's head: Linear(d, m*d) -> BatchNorm1d -> ReLU -> Linear(m*d, d_shared) -> L2-normalise."""

    def __init__(self, d_in: int, d_out: int = 512, hidden_mult: int = 2, removed_directions: int = 0):
        super().__init__(d_in, removed_directions)
        hidden = hidden_mult * d_in
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(self.prepare(x)), dim=-1)


class KernelHead(Head):
    """Head_B as a kernel regressor: a linear map plus Gaussian-kernel features around landmark captions.

        z = normalise(prepare(x));  head(z) = normalise(z L + k(z) W + b),  k(z)_j = exp(-gamma ||z - c_j||²)
                                                                                  = exp(2 gamma (z·c_j - 1))

    c_j: m landmarks (CLIP text anchors, a buffer: fixed), gamma a buffer; L, W, b trained (or fitted in
    closed form, train/closed_form.py: ridge on the linear part, the kernel's own norm on the kernel part,
    the Nyström form of kernel ridge regression). Why: every map from the CLIP space is fitted on English
    captions alone, a few thousand of them in the real-text benchmark; a linear map underfits the
    relation between two real sentence spaces and the paper's MLP, trained by gradient, does not
    generalise from so few (README, issue 13). Kernel ridge is the classic smooth regressor for that
    regime, and its Nyström form has a fixed size: m = hidden_mult * d landmarks, about the MLP's
    parameters. No BatchNorm: the head is the same function in training and in inference.
    """

    def __init__(self, d_in: int, d_out: int = 512, landmarks: int = 1024, removed_directions: int = 0):
        super().__init__(d_in, removed_directions)
        self.linear = nn.Linear(d_in, d_out)
        self.kernel = nn.Linear(landmarks, d_out, bias=False)
        nn.init.zeros_(self.kernel.weight)
        self.register_buffer("centres", F.normalize(torch.randn(landmarks, d_in), dim=-1))
        self.register_buffer("gamma", torch.tensor(1.0))

    @property
    def landmarks(self) -> int:
        return self.centres.shape[0]

    def set_centres(self, centres: torch.Tensor, gamma: float) -> None:
        """Landmarks [m, d_in] (L2-normalised here) and the kernel width gamma."""
        if tuple(centres.shape) != tuple(self.centres.shape):
            raise ValueError(f"landmarks {tuple(centres.shape)} do not fit this head {tuple(self.centres.shape)}")
        with torch.no_grad():
            self.centres.copy_(F.normalize(centres.to(self.centres.dtype), dim=-1))
            self.gamma.fill_(gamma)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """k(z): [B, m] kernel values of normalised inputs z around the landmarks."""
        return torch.exp(2 * self.gamma.to(z.dtype) * (z @ self.centres.to(z.dtype).T - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.prepare(x), dim=-1)
        return F.normalize(self.linear(z) + self.kernel(self.features(z)), dim=-1)


class UCLIPHeads(nn.Module):
    """head_a: multilingual text -> shared; head_b: CLIP image / CLIP English text -> shared.

    language_directions: width of the subspace Head_A removes from its input (0: none, the paper's heads);
    modality_directions: width of the subspace Head_B removes from its input (0: none; uclip_cli/subspaces.py);
    head_b: "mlp" (the paper's) or "kernel" (KernelHead with `landmarks` landmarks, default hidden_mult * d_clip).
    """

    def __init__(self, d_multi: int, d_clip: int, d_shared: int = 512, hidden_mult: int = 2,
                 language_directions: int = 0, modality_directions: int = 0, head_b: str = "mlp",
                 landmarks: int | None = None):
        super().__init__()
        if head_b not in HEAD_B_KINDS:
            raise ValueError(f"head_b {head_b!r}: choose one of {', '.join(HEAD_B_KINDS)}")
        self.d_multi, self.d_clip, self.d_shared, self.hidden_mult = d_multi, d_clip, d_shared, hidden_mult
        self.head_b_kind = head_b
        self.head_a = ProjectionHead(d_multi, d_shared, hidden_mult, removed_directions=language_directions)
        self.head_b = (ProjectionHead(d_clip, d_shared, hidden_mult, removed_directions=modality_directions)
                       if head_b == "mlp" else
                       KernelHead(d_clip, d_shared, landmarks or hidden_mult * d_clip,
                                  removed_directions=modality_directions))

    def dims(self) -> dict[str, int]:
        dims = {"multilingual": self.d_multi, "clip": self.d_clip, "shared": self.d_shared, "hidden_mult": self.hidden_mult}
        if self.head_a.removed_directions:
            dims["language_directions"] = self.head_a.removed_directions
        if self.head_b.removed_directions:
            dims["modality_directions"] = self.head_b.removed_directions
        if isinstance(self.head_b, KernelHead):
            dims["head_b"], dims["landmarks"] = "kernel", self.head_b.landmarks
        return dims


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not parameters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- safetensors

def save_heads(heads: UCLIPHeads, path: Path, *, config: TrainConfig | None = None,
               training_info: dict[str, Any] | None = None) -> None:
    """Write the heads' weights and BatchNorm statistics as safetensors (atomically), settings in metadata."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    metadata = {
        "format": HEADS_FORMAT,
        "format_version": str(HEADS_FORMAT_VERSION),
        "dims": json.dumps(heads.dims()),
        "train_config": json.dumps(config.to_dict() if config else None),
        "training": json.dumps(training_info),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Bytes, written by open(): the file gets the mode every other bundle file gets (0666 less the umask).
    # safetensors' save_file creates its file 0600, so heads.safetensors alone was private after each train.
    with open(tmp, "wb") as f:
        f.write(save(tensors, metadata=metadata))
    os.replace(tmp, path)


def load_heads(path: Path) -> tuple[UCLIPHeads, dict[str, Any]]:
    """Read heads written by `save_heads`; returns the heads (eval mode) and their metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HeadsError(f"{path} does not exist: train heads with `uclip train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise HeadsError(f"{path} is not a readable safetensors file ({e}): re-run `uclip train`") from None
    if raw.get("format") != HEADS_FORMAT:
        raise HeadsError(f"{path} is not a uclip heads file (no '{HEADS_FORMAT}' metadata)")
    meta = {k: (json.loads(v) if k in ("dims", "train_config", "training") else v) for k, v in raw.items()}
    dims = meta["dims"]
    heads = UCLIPHeads(dims["multilingual"], dims["clip"], dims["shared"], dims["hidden_mult"],
                       dims.get("language_directions", 0), dims.get("modality_directions", 0), dims.get("head_b", "mlp"),
                       dims.get("landmarks"))
    try:
        heads.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise HeadsError(f"{path} does not match the head shapes in its own metadata: {str(e).splitlines()[0]}") from None
    return heads.eval(), meta


# ---------------------------------------------------------------- ONNX

class _FoldedHead(nn.Module):
    """Inference form of a ProjectionHead: BatchNorm (running statistics) folded into the first Linear;
    the removed subspace (if any) stays a separate projection, since re-normalising after it is not linear."""

    def __init__(self, head: ProjectionHead):
        super().__init__()
        self.removed = None if head.removed is None else head.removed.detach().clone().float()
        lin1, bn, _, lin2 = head.net
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w1 = lin1.weight.double() * scale[:, None]
        b1 = (lin1.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
        self.lin1 = nn.Linear(lin1.in_features, lin1.out_features)
        self.lin2 = nn.Linear(lin2.in_features, lin2.out_features)
        with torch.no_grad():
            self.lin1.weight.copy_(w1.float())
            self.lin1.bias.copy_(b1.float())
            self.lin2.weight.copy_(lin2.weight)
            self.lin2.bias.copy_(lin2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.removed is not None:
            features = remove_subspace(features, self.removed)
        return F.normalize(self.lin2(torch.relu(self.lin1(features))), dim=-1)


def _export_one(head: Head, path: Path) -> None:
    inference = copy.deepcopy(head).cpu().float().eval()
    folded = (_FoldedHead(inference) if isinstance(head, ProjectionHead) else inference).eval()
    example = F.normalize(torch.randn(2, head.d_in), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # the TorchScript exporter: fast and exact for an MLP
        torch.onnx.export(
            folded, (example,), str(path),
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=17, dynamo=False,
        )


def check_head_onnx(head: Head, path: Path, sessions: SessionFactory, *, seed: int = 0) -> dict[str, float]:
    """The ONNX head against the exact (float64) PyTorch head in eval mode, on fresh inputs.

    The graph is opened by `sessions` on the CPU, as written (SessionFactory.create_as_written).
    Returns the largest difference and the largest float32 rounding bound of an output row
    (uclip_cli/export/rounding.py); raises HeadsError when a row differs by more than its bound.
    """
    from uclip_cli.export.rounding import float32_error_bound

    session = sessions.create_as_written(path).session
    exact = copy.deepcopy(head).cpu().double().eval()
    gen = torch.Generator().manual_seed(seed)
    worst, bound = 0.0, 0.0
    for batch in (1, 7, 64):   # several batch sizes exercise the dynamic axis
        x = F.normalize(torch.randn(batch, head.d_in, generator=gen), dim=-1)
        reference = float32_error_bound(exact, [x.double()])
        expected = reference.result.numpy()
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
        if got.shape != expected.shape:
            raise HeadsError(f"{path} returns shape {got.shape} for a batch of {batch}, expected {expected.shape}")
        error = np.abs(got - expected)
        allowed = np.broadcast_to(reference.bound.numpy(), error.shape)
        if not np.all(error <= allowed):
            raise HeadsError(f"{path} differs from the PyTorch head by {error.max():.2e}, beyond float32 rounding "
                             f"({allowed.max():.2e}): export is broken")
        worst, bound = max(worst, float(error.max())), max(bound, float(allowed.max()))
    return {"max_abs_diff": worst, "bound": bound}


def export_heads_onnx(heads: UCLIPHeads, out_dir: Path, *,
                      sessions: SessionFactory | None = None) -> dict[str, dict[str, float]]:
    """Write head_a.onnx and head_b.onnx into out_dir; returns each file's parity figures (check_head_onnx).

    sessions: the factory that opens the graphs for their check (None: a CPU factory).
    Raises HeadsError when a graph differs from the exact PyTorch head by more than float32 rounding explains.
    """
    out_dir = Path(out_dir)
    sessions = sessions if sessions is not None else SessionFactory(device="cpu")
    figures = {}
    for name, head in ((HEAD_A, heads.head_a), (HEAD_B, heads.head_b)):
        path = out_dir / name
        _export_one(head, path)
        figures[name] = check_head_onnx(head, path, sessions)
    return figures


def write_heads_into_bundle(heads: UCLIPHeads, bundle_dir: Path, training_info: dict[str, Any], *,
                            config: TrainConfig | None = None, sessions: SessionFactory | None = None) -> dict[str, Any]:
    """Write heads.safetensors, head_a.onnx and head_b.onnx into an existing bundle; returns the new manifest.

    sessions: the factory that opens the new graphs for their parity check (None: a CPU factory).
    Files are built in a temporary folder inside the bundle, moved into place with os.replace,
    then the manifest is re-checksummed, which changes the bundle fingerprint (indexes re-project).
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    dims = dict(manifest.get("dims", {}))
    for key, mine in (("multilingual", heads.d_multi), ("clip", heads.d_clip)):
        if key in dims and int(dims[key]) != mine:
            raise HeadsError(
                f"{bundle_dir}: the bundle's {key} encoder gives {dims[key]}-d features but the heads take {mine}-d: "
                "train with features from this bundle"
            )
    info = dict(training_info, onnx_parity=None)
    dims["shared"] = heads.d_shared
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".heads-") as tmp:
        tmp = Path(tmp)
        info["onnx_parity"] = export_heads_onnx(heads, tmp, sessions=sessions)
        save_heads(heads, tmp / HEADS_WEIGHTS, config=config, training_info=info)
        return install_files(bundle_dir, {name: tmp / name for name in (HEADS_WEIGHTS, HEAD_A, HEAD_B)},
                             dims=dims, extra={"training": info})

"""Head_B adapted to the image memory after its closed-form fit, without pairs (issue 20 item 3; off by default).

Head_B is fitted on English anchor captions only; a user's photos come from another distribution
(issue 20: anchors from CuPL descriptions, photos shown by XM3600 captions). The image memory is a
sample of that distribution, unpaired; the foreign memory is a sample of the text the queries look
like. TrainConfig.adapt_head_b names how the memories adapt Head_B once it is fitted:

    "mean"           the mean of Head_B's outputs on the image memory is moved onto the mean of Head_A's
                     outputs on the foreign memory (an affine shift of Head_B's last layer)
    "coral"          the same for mean and covariance (CORAL, Sun et al., "Return of Frustratingly Easy
                     Domain Adaptation", AAAI 2016): outputs whitened by the image memory's covariance and
                     recoloured by the foreign memory's, both shrunk toward a multiple of the identity by
                     CORAL_SHRINK (a few hundred rows do not fix a 384-d covariance)
    "coral-input"    CORAL on Head_B's side of the fit: the anchors' CLIP inputs (after the modality subspace) and
                     the kernel's landmarks recoloured to the image memory's mean and shrunk covariance, and
                     Head_B refitted in closed form on them (targets unchanged)
    "self-learning"  pseudo-pairs between the two memories, as unsupervised cross-lingual mapping does
                     (Artetxe et al., ACL 2018; Conneau/Lample et al., ICLR 2018): mutual nearest
                     neighbours under CSLS between Head_B(image memory) and Head_A(foreign memory); each
                     pair (photo, foreign sentence) joins the anchors as one more (e_I, e_K) row, weighted
                     SELF_WEIGHT, and Head_B is refitted in closed form; SELF_ROUNDS rounds

"mean" and "coral" fold an affine map into Head_B's last affine layer (the kernel head's linear, kernel
and bias, or the MLP's second Linear), so the exported graph is unchanged in shape. "coral-input" and
"self-learning" need the kernel head fitted from the CLIP space into the multilingual one (init ridge-to-multilingual).
At most ADAPT_ROWS rows of each memory are used (evenly spaced). Nothing here reads which foreign
sentence belongs to which photo: there is no such thing in a user's memories.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from uclip_cli.closed_form import fit_kernel_map

from .closed_form import set_kernel_map
from .config import ADAPTATIONS
from .heads import Head, KernelHead, UCLIPHeads

ADAPT_ROWS = 20_000          # rows of each memory the adaptation looks at (evenly spaced)
CORAL_SHRINK = 0.5           # covariance -> (1 - s) C + s tr(C)/rank I
CSLS_K = 10
SELF_ROUNDS = 2
SELF_WEIGHT = 1              # each pseudo-pair counts as this many anchor rows
BLOCK = 2048


def _evenly(array: np.ndarray, count: int) -> np.ndarray:
    rows = np.unique(np.linspace(0, len(array) - 1, min(len(array), count)).astype(np.int64))
    return np.asarray(array[rows], dtype=np.float32)


def _run(head: Head, x: np.ndarray, *, normalise: bool = True) -> np.ndarray:
    """head(x) in eval mode, float64; normalise=False: the output before its final L2 normalisation."""
    h = copy.deepcopy(head).double().eval()
    with torch.no_grad():
        t = F.normalize(torch.from_numpy(np.asarray(x, np.float32)).double(), dim=-1)
        if normalise:
            out = h(t)
        elif isinstance(h, KernelHead):
            z = F.normalize(h.prepare(t), dim=-1)
            out = h.linear(z) + h.kernel(h.features(z))
        else:
            out = h.net(h.prepare(t))
    return out.numpy()


def _sqrt_psd(c: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(c)
    values = np.maximum(values, 0.0)
    keep = values > values.max() * 1e-9
    scaled = np.zeros_like(values)
    scaled[keep] = values[keep] ** power
    return (vectors * scaled) @ vectors.T


def _shrunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance shrunk toward tr/rank times the identity on the span of the rows)."""
    mean = x.mean(axis=0)
    c = np.cov(x - mean, rowvar=False)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    span = vt[s > s.max() * 1e-6].T if len(s) else np.zeros((x.shape[1], 0))
    level = np.trace(c) / max(span.shape[1], 1)
    return mean, (1 - CORAL_SHRINK) * c + CORAL_SHRINK * level * (span @ span.T)


def moment_map(source: np.ndarray, target: np.ndarray, covariance: bool) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with x -> x A + c mapping the source rows' mean (and shrunk covariance) onto the target rows'."""
    mu_s, c_s = _shrunk(source)
    mu_t, c_t = _shrunk(target)
    a = _sqrt_psd(c_s, -0.5) @ _sqrt_psd(c_t, 0.5) if covariance else np.eye(source.shape[1])
    return a, mu_t - mu_s @ a


def fold_affine(head: Head, a: np.ndarray, c: np.ndarray) -> None:
    """head's output before normalisation y -> y A + c, written into its last affine layer."""
    layers = (head.linear, head.kernel) if isinstance(head, KernelHead) else (head.net[3],)
    bias_layer = head.linear if isinstance(head, KernelHead) else head.net[3]
    at = torch.from_numpy(a)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_((at.T @ layer.weight.double()).to(layer.weight.dtype))
        bias_layer.bias.copy_((bias_layer.bias.double() @ at + torch.from_numpy(c)).to(bias_layer.bias.dtype))


def csls_mutual_pairs(left: np.ndarray, right: np.ndarray, k: int = CSLS_K) -> tuple[np.ndarray, np.ndarray]:
    """(i, j): the rows of left and right (normalised) that are each other's nearest neighbour under CSLS,
    2 cos(l, r) - r_l - r_r with r the mean cosine to the k nearest rows of the other side."""
    k_l, k_r = min(k, len(right)), min(k, len(left))

    def mean_top(a: np.ndarray, b: np.ndarray, kk: int) -> np.ndarray:
        out = np.empty(len(a))
        for s in range(0, len(a), BLOCK):
            sims = a[s:s + BLOCK] @ b.T
            out[s:s + BLOCK] = np.mean(-np.partition(-sims, kk - 1, axis=1)[:, :kk], axis=1)
        return out

    r_l, r_r = mean_top(left, right, k_l), mean_top(right, left, k_r)
    best_j = np.empty(len(left), np.int64)
    col_best, col_arg = np.full(len(right), -np.inf), np.zeros(len(right), np.int64)
    for s in range(0, len(left), BLOCK):
        scores = 2 * (left[s:s + BLOCK] @ right.T) - r_l[s:s + BLOCK, None] - r_r[None, :]
        best_j[s:s + BLOCK] = np.argmax(scores, axis=1)
        top = np.argmax(scores, axis=0)
        better = scores[top, np.arange(len(right))] > col_best
        col_best[better] = scores[top, np.arange(len(right))][better]
        col_arg[better] = top[better] + s
    i = np.flatnonzero(col_arg[best_j] == np.arange(len(left)))
    return i, best_j[i]


def adapt_head_b(heads: UCLIPHeads, kind: str, image_memory: np.ndarray, foreign_memory: np.ndarray, *,
                 anchors: tuple[np.ndarray, np.ndarray] | None = None, embed: np.ndarray | None = None) -> dict[str, Any]:
    """Adapt heads.head_b to the image memory (module docstring); returns what was done.

    anchors: (z_I, e_K) the closed-form fit was made on (Head_B's prepared, normalised inputs and its targets in
    the multilingual space) and embed its map into the shared space, both needed by "self-learning" only."""
    if kind not in ADAPTATIONS:
        raise ValueError(f"Head_B adaptation {kind!r}: choose one of {', '.join(ADAPTATIONS)}")
    images = _evenly(image_memory, ADAPT_ROWS)
    foreign = _evenly(foreign_memory, ADAPT_ROWS)
    target = _run(heads.head_a, foreign)
    if kind in ("mean", "coral"):
        a, c = moment_map(_run(heads.head_b, images, normalise=False), target, covariance=kind == "coral")
        fold_affine(heads.head_b, a, c)
        return {"adapt_head_b": kind, "adapt_rows": [len(images), len(foreign)]}
    head = heads.head_b
    if not isinstance(head, KernelHead) or anchors is None or embed is None:
        raise ValueError(f"{kind} adaptation needs the kernel Head_B fitted in closed form "
                         "(head_b kernel, init ridge-to-multilingual)")
    z_I, e_K = anchors
    with torch.no_grad():
        z_img = F.normalize(head.prepare(F.normalize(torch.from_numpy(images).double(), dim=-1)), dim=-1).numpy()
    if kind == "coral-input":
        a, c = moment_map(z_I, z_img, covariance=True)
        recolour = lambda z: z @ a + c                                   # noqa: E731
        unit = lambda z: z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)   # noqa: E731
        centres = unit(recolour(head.centres.double().numpy()))
        head.set_centres(torch.from_numpy(centres), float(head.gamma))
        set_kernel_map(head, fit_kernel_map(unit(recolour(z_I)), e_K, centres), embed)
        return {"adapt_head_b": kind, "adapt_rows": [len(images), len(foreign)]}
    with torch.no_grad():
        prepared = F.normalize(heads.head_a.prepare(F.normalize(torch.from_numpy(foreign).double(), dim=-1)),
                               dim=-1).numpy()
    centres = head.centres.double().numpy()
    counts = []
    for _ in range(SELF_ROUNDS):
        i, j = csls_mutual_pairs(_run(head, images), target)
        counts.append(int(len(i)))
        x = np.concatenate([z_I, *([z_img[i]] * SELF_WEIGHT)])
        y = np.concatenate([e_K, *([prepared[j]] * SELF_WEIGHT)])
        set_kernel_map(head, fit_kernel_map(x, y, centres), embed)
    return {"adapt_head_b": kind, "adapt_rows": [len(images), len(foreign)], "pseudo_pairs": counts}

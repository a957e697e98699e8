"""Closed-form starts for the heads: a linear alignment fitted on the anchors, written into the MLPs.

With a few thousand anchors the contrastive phase starts from random heads and, in the steps a
small corpus gives, stays below a plain ridge map fitted on the same English captions (issue 13:
ridge 4.5 R@1 against 3.6 for 20 epochs of the method). A closed-form alignment is the classic start
for cross-space maps (Mikolov et al. 2013, linear maps between embedding spaces; Xing et al. 2015 and
Smith et al. 2017, orthogonal Procrustes): fit it on the anchors, then let the contrastive phase
improve on it instead of rediscovering it.

Each head is Linear(d, h) -> BatchNorm -> ReLU -> Linear(h, d_shared) with h = hidden_mult * d >= 2d,
so it can compute any linear map exactly: the first layer copies x and -x into the first 2d hidden
units, BatchNorm standardises them with the anchors' mean m and deviation s, ReLU keeps the positive
part of each, and since relu(a) - relu(-a) = a the second layer recovers (x - m) / s, scales it back
and applies the map M: head(x) = normalise(x M). Exact in eval mode (running statistics = the
anchors'), and close to it in train mode (batch statistics of 512 anchors).

    Head_B: M_B = an isometric embedding of the CLIP space into the shared space (identity, zero-padded;
            the top principal directions of the anchors' e_I when d_clip > d_shared)
    Head_A: M_A = W M_B, W the map from the multilingual to the CLIP space fitted on the anchors:
            "ridge" (least squares, lambda chosen on a held-out tenth of the anchors) or "procrustes"
            (the orthogonal map closest to the anchors' cross-covariance)

"ridge-to-multilingual" fits the map the other way round, and the shared space starts as the
multilingual space itself (after Head_A's removed language subspace):

    Head_A: M_A = an isometric embedding of the multilingual space (identity, zero-padded, or its top
            principal directions), so foreign text keeps the similarity structure the multilingual
            encoder gives it
    Head_B: M_B = V M_A, V the ridge map from the CLIP space into the multilingual space

Why the direction matters: every map here is fitted on English captions only. Fitted on the
multilingual side (ridge, procrustes) it is then applied to foreign text, inputs it was never fitted
on, and it distorts them; fitted on the CLIP side it is applied at query time only to what it was
fitted for (CLIP vectors), while foreign text goes through nothing fitted on English. This is the
locked-tower idea of LiT (Zhai et al., CVPR 2022: keep the pretrained tower whose inputs the paired
data do not cover, train the other into its space); with TrainConfig.freeze_head_a Head_A stays
exactly this embedding and only Head_B trains.

With a kernel Head_B (TrainConfig.head_b = "kernel", heads.KernelHead), V is not linear: Head_B
regresses the multilingual space on the CLIP space with a linear part plus Gaussian-kernel features
around m anchor captions (fit_kernel_map: Nyström kernel ridge regression beside a ridge map, kernel
width and both penalties chosen on the held-out tenth). On the real-text benchmark the linear map
leaves 1-2 R@1 points that a smooth regressor recovers from the same 1,900 captions; where the
relation is linear (the synthetic world) the chosen penalties switch the kernel part (nearly) off.
The fit is a few solves of a (d + m + 1)-square system after one pass over the anchors per width:
seconds for the real-text benchmark, about a minute for 200,000 CLIP anchors (d 512, m 1,024).
"""
from __future__ import annotations

import numpy as np
import torch

from uclip_cli.closed_form import FIT_ROWS, fit_kernel_map, fit_ridge, landmarks_of, procrustes, shared_embedding

from .config import INITS
from .heads import Head, KernelHead, UCLIPHeads


def set_linear(head: Head, inputs: np.ndarray, mapping: np.ndarray) -> None:
    """Make head(x) = normalise(prepare(x) @ mapping) exactly in eval mode; inputs: anchors it will see."""
    if isinstance(head, KernelHead):     # its linear part is the map itself, its kernel part silent
        with torch.no_grad():
            head.linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(mapping.T)))
            head.linear.bias.zero_()
            head.kernel.weight.zero_()
        return
    lin1, bn, _, lin2 = head.net
    d, hidden = lin1.in_features, lin1.out_features
    if hidden < 2 * d:
        raise ValueError(f"a closed-form start needs a hidden layer of at least 2 x {d} units, the head has {hidden}")
    with torch.no_grad():
        x = head.prepare(torch.from_numpy(np.asarray(inputs, dtype=np.float32))).double().numpy()
    m, s = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    w1 = np.zeros((hidden, d))
    w1[:d], w1[d:2 * d] = np.eye(d), -np.eye(d)
    mean = np.zeros(hidden)
    mean[:d], mean[d:2 * d] = m, -m
    var = np.ones(hidden)
    var[:2 * d] = np.tile(np.maximum(s ** 2 - bn.eps, 1e-12), 2)
    scaled = s[:, None] * mapping                              # [d, d_shared]
    w2 = np.zeros((mapping.shape[1], hidden))
    w2[:, :d], w2[:, d:2 * d] = scaled.T, -scaled.T
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(w1))
        lin1.bias.zero_()
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        lin2.weight.copy_(torch.from_numpy(w2))
        lin2.bias.copy_(torch.from_numpy(m @ mapping))


def set_landmarks(head: KernelHead, english_clip: np.ndarray, rows: np.ndarray) -> None:
    """The kernel head's landmarks: evenly spaced anchors, as the head sees them (after its removed subspace)."""
    picked = np.asarray(english_clip[landmarks_of(np.asarray(rows), head.landmarks)], dtype=np.float32)
    with torch.no_grad():
        z = torch.nn.functional.normalize(head.prepare(torch.from_numpy(picked)), dim=-1)
    head.set_centres(z, float(head.gamma))


def set_kernel_map(head: KernelHead, fitted: dict, mapping: np.ndarray) -> None:
    """Make head(x) = normalise((x L + k(x) W + b) @ mapping) for a fit_kernel_map result."""
    with torch.no_grad():
        head.gamma.fill_(fitted["gamma"])
        head.linear.weight.copy_(torch.from_numpy(np.ascontiguousarray((fitted["linear"] @ mapping).T)))
        head.linear.bias.copy_(torch.from_numpy(fitted["bias"] @ mapping))
        head.kernel.weight.copy_(torch.from_numpy(np.ascontiguousarray((fitted["kernel"] @ mapping).T)))


def anchor_features(heads: UCLIPHeads, english_clip: np.ndarray, english_multi: np.ndarray,
                    rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(rows, raw_I, raw_K, e_I, e_K) of the anchors a closed form is fitted on (at most FIT_ROWS of `rows`, evenly
    spaced): raw_I normalised, raw_K as given; e_I, e_K each head's input after its removed subspace (float64)."""
    rows = np.arange(len(english_clip)) if rows is None else np.sort(np.asarray(rows))
    rows = rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), FIT_ROWS)).astype(np.int64))]
    raw_I = np.asarray(english_clip[rows], dtype=np.float32)
    raw_K = np.asarray(english_multi[rows], dtype=np.float32)
    with torch.no_grad():    # the fit sees what each head's first layer sees: its input after its removed subspace
        e_I = heads.head_b.prepare(torch.nn.functional.normalize(torch.from_numpy(raw_I), dim=-1)).double().numpy()
        e_K = heads.head_a.prepare(torch.nn.functional.normalize(torch.from_numpy(raw_K), dim=-1)).double().numpy()
    return rows, raw_I / np.linalg.norm(raw_I, axis=1, keepdims=True), raw_K, e_I, e_K


def closed_form_start(heads: UCLIPHeads, english_clip: np.ndarray, english_multi: np.ndarray, kind: str, *,
                      rows: np.ndarray | None = None) -> dict:
    """Write the closed-form alignment `kind` ("ridge" | "procrustes" | "ridge-to-multilingual") into both
    heads, fitted on the anchors `rows` (default all; at most FIT_ROWS of them, evenly spaced); returns
    what was fitted."""
    if kind not in INITS[1:]:
        raise ValueError(f"closed-form start {kind!r}: choose one of {', '.join(INITS[1:])}")
    rows, raw_I, raw_K, e_I, e_K = anchor_features(heads, english_clip, english_multi, rows)
    info: dict = {"init": kind, "anchors": len(rows)}
    if kind == "ridge-to-multilingual":
        embed = shared_embedding(e_K, heads.d_shared)
        set_linear(heads.head_a, raw_K / np.linalg.norm(raw_K, axis=1, keepdims=True), embed)
        if isinstance(heads.head_b, KernelHead):
            z_I = e_I / np.linalg.norm(e_I, axis=1, keepdims=True)
            fitted = fit_kernel_map(z_I, e_K, heads.head_b.centres.double().numpy())
            set_kernel_map(heads.head_b, fitted, embed)
            info.update({k: fitted[k] for k in ("gamma", "lambda_linear", "lambda_kernel")})
        else:
            v, info["lambda"] = fit_ridge(e_I, e_K)
            set_linear(heads.head_b, raw_I, v @ embed)
        return info
    embed = shared_embedding(e_I, heads.d_shared)
    if kind == "ridge":
        w, info["lambda"] = fit_ridge(e_K, e_I)
    else:
        w = procrustes(e_K, e_I)
    set_linear(heads.head_b, raw_I, embed)
    set_linear(heads.head_a, raw_K / np.linalg.norm(raw_K, axis=1, keepdims=True), w @ embed)
    return info

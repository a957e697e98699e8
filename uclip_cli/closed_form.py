"""Closed-form maps between embedding spaces, fitted on English anchor captions (numpy only).

The heads' closed forms (issue 13): a ridge map, an orthogonal Procrustes map, the isometric embedding
of a space into the shared one, and the kernel head's Nyström kernel ridge regression beside a ridge
linear part. `uclip train` writes them into its torch heads (train/closed_form.py, whose docstring
argues the choices); a default bundle assembled without torch writes them as ONNX graphs directly
(assemble.py, head_graphs.py). Everything here is float64 numpy, so both give the same maps.
"""
from __future__ import annotations

import numpy as np

RIDGE_LAMBDAS = (0.001, 0.01, 0.1, 1.0, 10.0)
FIT_ROWS = 200_000            # anchors used for the fit (evenly spaced; a closed form needs no more)
# the kernel head's fit (Nyström kernel ridge plus a ridge linear part): every combination is tried and the
# one with the smallest squared error on the held-out tenth kept; the largest kernel penalty switches the
# kernel part off, so the fit falls back to (about) the linear map where the kernel does not help
KERNEL_GAMMAS = (0.5, 1.0, 2.0)
KERNEL_LINEAR_LAMBDAS = (0.1, 0.3, 1.0, 3.0)
KERNEL_LAMBDAS = (0.01, 0.1, 1.0, 10.0, 1e6)
GRAM_BLOCK_ROWS = 16384


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """W minimising ||x W - y||² + lam ||W||² (float64)."""
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def fit_ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge map x -> y with lambda chosen by squared error on a held-out tenth (fixed split)."""
    order = np.random.default_rng(0).permutation(len(x))
    held, fit = order[: max(len(x) // 10, 1)], order[max(len(x) // 10, 1):]
    errors = {lam: float(np.sum((x[held] @ ridge(x[fit], y[fit], lam) - y[held]) ** 2)) for lam in RIDGE_LAMBDAS}
    lam = min(RIDGE_LAMBDAS, key=lambda l: (errors[l], -l))
    return ridge(x, y, lam), lam


def procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The (semi-)orthogonal W [d_x, d_y] maximising trace(Wᵀ xᵀ y)."""
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return u @ vt


def shared_embedding(e_I: np.ndarray, d_shared: int) -> np.ndarray:
    """[d_clip, d_shared] with orthonormal rows' span: identity padded, or the top principal directions."""
    d_clip = e_I.shape[1]
    if d_clip <= d_shared:
        return np.eye(d_clip, d_shared)
    _, _, vt = np.linalg.svd(e_I - e_I.mean(axis=0), full_matrices=False)
    return vt[:d_shared].T


def kernel_design(x: np.ndarray, centres: np.ndarray, gamma: float) -> np.ndarray:
    """[x, k(x), 1]: the kernel head's regressors for normalised rows x (float64)."""
    return np.hstack([x, np.exp(2 * gamma * (x @ centres.T - 1)), np.ones((len(x), 1))])


def _gram(x: np.ndarray, y: np.ndarray, centres: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray, float]:
    """AᵀA, Aᵀy and ||y||² for the design A of x, block by block (A itself is never held whole)."""
    width = x.shape[1] + len(centres) + 1
    gram, cross, total = np.zeros((width, width)), np.zeros((width, y.shape[1])), 0.0
    for start in range(0, len(x), GRAM_BLOCK_ROWS):
        a = kernel_design(x[start:start + GRAM_BLOCK_ROWS], centres, gamma)
        block = y[start:start + GRAM_BLOCK_ROWS]
        gram += a.T @ a
        cross += a.T @ block
        total += float(np.sum(block ** 2))
    return gram, cross, total


def fit_kernel_map(x: np.ndarray, y: np.ndarray, centres: np.ndarray, kernel_scale: float = 1.0) -> dict:
    """The kernel head's closed form: y ≈ x L + k(x) W + b, k the Gaussian kernel around the landmarks.

    Minimises ||x L + k(x) W + b - y||² + lam_lin ||L||² + lam_k tr(Wᵀ K W), K = k(centres, centres): ridge on
    the linear part and the kernel's own (RKHS) norm on the kernel part, i.e. Nyström kernel ridge
    regression (Williams & Seeger 2001) beside a linear ridge map. gamma, lam_lin and lam_k are chosen by
    squared error on a held-out tenth of the rows (fixed split), then the map is refitted on all rows.
    x: normalised inputs [N, d]; y: targets [N, d_y]; centres: normalised landmarks [m, d].
    kernel_scale multiplies the chosen kernel penalty before the final fit (> 1: closer to the linear map; the
    held-out tenth is the anchors' own style, so it cannot see how far the kernel part carries to other text)."""
    d, m = x.shape[1], len(centres)
    order = np.random.default_rng(0).permutation(len(x))
    cut = max(len(x) // 10, 1)
    held, fit = np.sort(order[:cut]), np.sort(order[cut:])
    best = None
    for gamma in KERNEL_GAMMAS:
        g_fit, r_fit, _ = _gram(x[fit], y[fit], centres, gamma)
        g_held, r_held, y_held = _gram(x[held], y[held], centres, gamma)
        k_mm = np.exp(2 * gamma * (centres @ centres.T - 1))
        for lam_lin in KERNEL_LINEAR_LAMBDAS:
            for lam_k in KERNEL_LAMBDAS:
                w = _solve(g_fit, r_fit, k_mm, d, lam_lin, lam_k)
                error = float(np.sum(w * (g_held @ w)) - 2 * np.sum(w * r_held) + y_held)
                if best is None or error < best[0]:
                    best = (error, gamma, lam_lin, lam_k, g_fit + g_held, r_fit + r_held, k_mm)
    _, gamma, lam_lin, lam_k, gram, cross, k_mm = best
    lam_k *= kernel_scale
    w = _solve(gram, cross, k_mm, d, lam_lin, lam_k)
    return {"linear": w[:d], "kernel": w[d:d + m], "bias": w[-1], "gamma": gamma, "lambda_linear": lam_lin,
            "lambda_kernel": lam_k}


def _solve(gram: np.ndarray, cross: np.ndarray, k_mm: np.ndarray, d: int, lam_lin: float, lam_k: float) -> np.ndarray:
    m = len(k_mm)
    penalty = np.zeros_like(gram)
    penalty[:d, :d] = lam_lin * np.eye(d)
    penalty[d:d + m, d:d + m] = lam_k * k_mm + 1e-9 * np.eye(m)
    return np.linalg.solve(gram + penalty, cross)


def landmarks_of(inputs: np.ndarray, count: int) -> np.ndarray:
    """count rows of inputs, evenly spaced (deterministic: the same anchors give the same landmarks)."""
    if len(inputs) < count:
        raise ValueError(f"a kernel head with {count} landmarks needs at least {count} captions, there are {len(inputs)}")
    return inputs[np.linspace(0, len(inputs) - 1, count).astype(np.int64)]

"""uCLIP's losses and the training-time perturbation (method.md, steps 3 and 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig

LOSS_TERMS = ("text", "pseudo", "intra", "total")


def sym_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """½[CE(a·bᵀ/τ, diag) + CE(b·aᵀ/τ, diag)], row i of a paired with row i of b."""
    logits = (a.float() @ b.float().T) / tau
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def intra_loss(z_k: torch.Tensor, z_K: torch.Tensor, z_I: torch.Tensor, z_v: torch.Tensor) -> torch.Tensor:
    """mean_i ½(‖ẑ_k − ẑ_K‖₂ + ‖ẑ_I − ẑ_v‖₂), plain (not squared) L2."""
    d_text = torch.linalg.vector_norm(z_k.float() - z_K.float(), dim=-1)
    d_clip = torch.linalg.vector_norm(z_I.float() - z_v.float(), dim=-1)
    return (0.5 * (d_text + d_clip)).mean()


def uclip_losses(z_K: torch.Tensor, z_I: torch.Tensor, z_k: torch.Tensor, z_v: torch.Tensor,
                 config: TrainConfig) -> dict[str, torch.Tensor]:
    """Every term (for reporting) and the total over the terms the config switches on.

    z_K = Head_A(e_K), z_I = Head_B(e_I), z_k = Head_A(k), z_v = Head_B(v).
    """
    terms = {
        "text": sym_nce(z_K, z_I, config.tau),
        "pseudo": sym_nce(z_k, z_v, config.tau),
        "intra": intra_loss(z_k, z_K, z_I, z_v),
    }
    total = terms["text"].new_zeros(())
    if config.use_text:
        total = total + terms["text"]
    if config.use_pseudo:
        total = total + terms["pseudo"]
    if config.use_intra:
        total = total + config.lambda_intra * terms["intra"]
    terms["total"] = total
    return terms


def perturb(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """normalise(x + ε), ε ~ N(0, σ²I)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.normalize(x + sigma * noise, dim=-1)

"""uCLIP losses and perturbation against values computed by hand (scalar math, not the code under test)."""
import math

import numpy as np
import pytest
import torch

from uclip_cli.train.config import TrainConfig
from uclip_cli.train.losses import intra_loss, perturb, sym_nce, uclip_losses


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_sym_nce_identity_pairs_hand_value():
    # logits = I / 0.5 = [[2, 0], [0, 2]]: every row and column gives -log(e^2 / (e^2 + 1))
    expected = math.log(1 + math.exp(-2))
    assert sym_nce(t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]]), tau=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_sym_nce_asymmetric_hand_value():
    a, b = t([[1, 0], [0, 1]]), t([[0.6, 0.8], [1, 0]])
    # a·bᵀ = [[0.6, 1.0], [0.8, 0.0]] at tau = 1
    a_to_b = (-0.6 + math.log(math.exp(0.6) + math.exp(1.0)) + -0.0 + math.log(math.exp(0.8) + math.exp(0.0))) / 2
    b_to_a = (-0.6 + math.log(math.exp(0.6) + math.exp(0.8)) + -0.0 + math.log(math.exp(1.0) + math.exp(0.0))) / 2
    assert sym_nce(a, b, tau=1.0).item() == pytest.approx((a_to_b + b_to_a) / 2, abs=1e-6)
    # the temperature divides the logits: tau = 0.5 doubles them
    a_to_b_half = (-1.2 + math.log(math.exp(1.2) + math.exp(2.0)) + math.log(math.exp(1.6) + 1)) / 2
    b_to_a_half = (-1.2 + math.log(math.exp(1.2) + math.exp(1.6)) + math.log(math.exp(2.0) + 1)) / 2
    assert sym_nce(a, b, tau=0.5).item() == pytest.approx((a_to_b_half + b_to_a_half) / 2, abs=1e-6)


def test_sym_nce_matches_numpy_on_random_unit_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / 0.01

    def ce_diag(m):
        m = m - m.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m)))

    expected = 0.5 * (ce_diag(logits) + ce_diag(logits.T))
    got = sym_nce(torch.from_numpy(a).float(), torch.from_numpy(b).float(), tau=0.01).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_intra_is_plain_l2_mean_of_half_sums():
    z_k, z_K = t([[1, 0], [0, 1]]), t([[0, 1], [0, 1]])      # distances sqrt(2), 0
    z_I, z_v = t([[1, 0], [0.6, 0.8]]), t([[1, 0], [1, 0]])  # distances 0, sqrt(0.16 + 0.64)
    expected = (0.5 * (math.sqrt(2) + 0) + 0.5 * (0 + math.sqrt(0.8))) / 2
    assert intra_loss(z_k, z_K, z_I, z_v).item() == pytest.approx(expected, abs=1e-6)


def test_intra_gradient_is_finite_where_pairs_coincide():
    z = t([[1, 0], [0, 1]]).requires_grad_()
    intra_loss(z, z.detach(), z, z.detach()).backward()
    assert torch.isfinite(z.grad).all()


def test_total_loss_weights_and_ablation_switches():
    rng = np.random.default_rng(1)
    z = [torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((4, 3))).float(), dim=-1) for _ in range(4)]
    full = uclip_losses(*z, TrainConfig())
    assert full["total"].item() == pytest.approx(
        full["text"].item() + full["pseudo"].item() + 0.1 * full["intra"].item(), rel=1e-6)
    no_text = uclip_losses(*z, TrainConfig(use_text=False))["total"].item()
    assert no_text == pytest.approx(full["pseudo"].item() + 0.1 * full["intra"].item(), rel=1e-6)
    no_pseudo = uclip_losses(*z, TrainConfig(use_pseudo=False))["total"].item()
    assert no_pseudo == pytest.approx(full["text"].item() + 0.1 * full["intra"].item(), rel=1e-6)
    no_intra = uclip_losses(*z, TrainConfig(use_intra=False))["total"].item()
    assert no_intra == pytest.approx(full["text"].item() + full["pseudo"].item(), rel=1e-6)
    # z = (z_K, z_I, z_k, z_v): text pairs z_K with z_I, pseudo pairs z_k with z_v
    assert full["text"].item() == pytest.approx(sym_nce(z[0], z[1], 0.01).item(), rel=1e-6)
    assert full["pseudo"].item() == pytest.approx(sym_nce(z[2], z[3], 0.01).item(), rel=1e-6)


def test_perturbation_keeps_unit_norm_and_uses_sigma_as_standard_deviation():
    d, n = 512, 4000
    x = torch.zeros(n, d)
    x[:, 0] = 1
    gen = torch.Generator().manual_seed(0)
    y = perturb(x, math.sqrt(0.004), gen)
    assert torch.allclose(y.norm(dim=-1), torch.ones(n), atol=1e-5)
    # |x + eps|^2 ~ 1 + d * sigma^2, so the cosine with x is about 1 / sqrt(1 + 512 * 0.004) = 0.573
    assert (y @ x[0]).mean().item() == pytest.approx(1 / math.sqrt(1 + d * 0.004), abs=0.01)
    assert torch.equal(perturb(x, 0.0, gen), x)

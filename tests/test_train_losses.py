"""uCLIP losses and perturbation against values computed by hand (scalar math, not the code under test).

The losses run in float32; each is compared with its exact value within a bound derived from float32
rounding (tests/rounding.py), never at a hand-picked tolerance.
"""
import math

import numpy as np
import pytest
import torch

from rounding import U32, assert_within, gamma
from uclip_cli.train.config import TrainConfig
from uclip_cli.train.losses import intra_loss, perturb, sym_nce, uclip_losses


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def cross_entropy_bound(logits: np.ndarray, logit_error: np.ndarray) -> float:
    """Bound on |float32 mean_i CE(logits_i, i) - its exact value| when each logit is off by <= logit_error.

    CE_i = logsumexp_j L_ij - L_ii moves by <= 2 max_j δL_ij; the float32 log-softmax rounds the shift by
    the row maximum (u |L_ij - m| in an exponent), exp, the k-term positive sum (gamma(k)), the log and
    the subtractions; the mean of n positive terms adds gamma(n) relatively.
    """
    n, k = logits.shape
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    ce = lse - np.diag(logits)
    per_row = (2 * logit_error.max(axis=1) + U32 * np.abs(logits - m[:, None]).max(axis=1) + gamma(k) + 6 * U32
               + U32 * (np.abs(lse) + np.abs(ce)))
    return float(per_row.mean() + gamma(n + 1) * ce.mean())


def sym_nce_exact_and_bound(a, b, tau: float) -> tuple[float, float]:
    """½[CE(a·bᵀ/τ) + CE(b·aᵀ/τ)] in float64 from the float32 inputs, and its float32 rounding bound."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    logits = a @ b.T / tau
    logit_error = (gamma(a.shape[1]) * (np.abs(a) @ np.abs(b).T) / tau + 2 * U32 * np.abs(logits))
    ce = [np.mean(np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - np.diag(x)) for x in (logits, logits.T)]
    bound = 0.5 * (cross_entropy_bound(logits, logit_error) + cross_entropy_bound(logits.T, logit_error.T))
    exact = 0.5 * (ce[0] + ce[1])
    return float(exact), bound + 2 * U32 * abs(exact)


def sum_bound(*terms: float) -> float:
    """A float32 sum of len(terms) values (a Python coefficient rounded to float32 counts as one more rounding)."""
    return gamma(len(terms) + 1) * sum(abs(x) for x in terms)


def test_sym_nce_identity_pairs_hand_value():
    # logits = I / 0.5 = [[2, 0], [0, 2]]: every row and column gives -log(e^2 / (e^2 + 1))
    expected = math.log(1 + math.exp(-2))
    identity = [[1, 0], [0, 1]]
    _, bound = sym_nce_exact_and_bound(identity, identity, 0.5)
    assert_within(sym_nce(t(identity), t(identity), tau=0.5).item(), expected, bound)


def test_sym_nce_asymmetric_hand_value():
    a, b = t([[1, 0], [0, 1]]), t([[0.6, 0.8], [1, 0]])
    # a·bᵀ = [[0.6, 1.0], [0.8, 0.0]] at tau = 1
    a_to_b = (-0.6 + math.log(math.exp(0.6) + math.exp(1.0)) + -0.0 + math.log(math.exp(0.8) + math.exp(0.0))) / 2
    b_to_a = (-0.6 + math.log(math.exp(0.6) + math.exp(0.8)) + -0.0 + math.log(math.exp(1.0) + math.exp(0.0))) / 2
    assert_within(sym_nce(a, b, tau=1.0).item(), (a_to_b + b_to_a) / 2, sym_nce_exact_and_bound(a, b, 1.0)[1])
    # the temperature divides the logits: tau = 0.5 doubles them
    a_to_b_half = (-1.2 + math.log(math.exp(1.2) + math.exp(2.0)) + math.log(math.exp(1.6) + 1)) / 2
    b_to_a_half = (-1.2 + math.log(math.exp(1.2) + math.exp(1.6)) + math.log(math.exp(2.0) + 1)) / 2
    assert_within(sym_nce(a, b, tau=0.5).item(), (a_to_b_half + b_to_a_half) / 2, sym_nce_exact_and_bound(a, b, 0.5)[1])


def test_sym_nce_matches_numpy_on_random_unit_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    a = (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    b = (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32)
    logits = a.astype(np.float64) @ b.T.astype(np.float64) / 0.01

    def ce_diag(m):
        m = m - m.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m)))

    expected = 0.5 * (ce_diag(logits) + ce_diag(logits.T))
    got = sym_nce(torch.from_numpy(a), torch.from_numpy(b), tau=0.01).item()
    assert_within(got, expected, sym_nce_exact_and_bound(a, b, 0.01)[1])


def test_intra_is_plain_l2_mean_of_half_sums():
    z_k, z_K = t([[1, 0], [0, 1]]), t([[0, 1], [0, 1]])      # distances sqrt(2), 0
    z_I, z_v = t([[1, 0], [0.6, 0.8]]), t([[1, 0], [1, 0]])  # distances 0, sqrt(0.16 + 0.64)
    expected = (0.5 * (math.sqrt(2) + 0) + 0.5 * (0 + math.sqrt(0.8))) / 2
    # inputs rounded to float32 (0.6, 0.8), a subtraction, a 2-term sum of squares and a root per distance,
    # a half sum and a 2-term mean, all of positive terms
    bound = (4 * U32 + gamma(3) / 2 + 2 * U32 + gamma(3)) * expected
    assert_within(intra_loss(z_k, z_K, z_I, z_v).item(), expected, bound)


def test_intra_gradient_is_finite_where_pairs_coincide():
    z = t([[1, 0], [0, 1]]).requires_grad_()
    intra_loss(z, z.detach(), z, z.detach()).backward()
    assert torch.isfinite(z.grad).all()


def test_total_loss_weights_and_ablation_switches():
    rng = np.random.default_rng(1)
    z = [torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((4, 3))).float(), dim=-1) for _ in range(4)]
    full = uclip_losses(*z, TrainConfig())
    text, pseudo, intra = (full[k].item() for k in ("text", "pseudo", "intra"))
    # the totals are float32 sums of the float32 terms (the weight 0.1 rounded to float32 once more)
    assert_within(full["total"].item(), text + pseudo + 0.1 * intra, sum_bound(text, pseudo, 0.1 * intra))
    no_text = uclip_losses(*z, TrainConfig(use_text=False))["total"].item()
    assert_within(no_text, pseudo + 0.1 * intra, sum_bound(pseudo, 0.1 * intra))
    no_pseudo = uclip_losses(*z, TrainConfig(use_pseudo=False))["total"].item()
    assert_within(no_pseudo, text + 0.1 * intra, sum_bound(text, 0.1 * intra))
    no_intra = uclip_losses(*z, TrainConfig(use_intra=False))["total"].item()
    assert_within(no_intra, text + pseudo, sum_bound(text, pseudo))
    # z = (z_K, z_I, z_k, z_v): text pairs z_K with z_I, pseudo pairs z_k with z_v (the same float32 computation)
    assert text == sym_nce(z[0], z[1], 0.01).item() != sym_nce(z[0], z[3], 0.01).item()
    assert pseudo == sym_nce(z[2], z[3], 0.01).item() != sym_nce(z[2], z[1], 0.01).item()


def test_perturbation_keeps_unit_norm_and_uses_sigma_as_standard_deviation():
    d, n = 512, 4000
    x = torch.zeros(n, d)
    x[:, 0] = 1
    gen = torch.Generator().manual_seed(0)
    y = perturb(x, math.sqrt(0.004), gen)
    # a float32 normalisation: a d-term sum of squares (gamma(d + 1)), a root and a division per element
    assert_within(y.double().norm(dim=-1).numpy(), 1.0, gamma(d + 1) / 2 + 3 * U32, what="norms")
    # |x + eps|^2 ~ 1 + d * sigma^2, so the cosine with x is about 1 / sqrt(1 + 512 * 0.004) = 0.573
    assert (y @ x[0]).mean().item() == pytest.approx(1 / math.sqrt(1 + d * 0.004), abs=0.01)
    assert torch.equal(perturb(x, 0.0, gen), x)

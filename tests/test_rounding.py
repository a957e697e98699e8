"""The float32 rounding envelope used by parity checks (uclip_cli/export/rounding.py) on cases with a known answer."""
import numpy as np
import torch

from rounding import U32, gamma
from uclip_cli.export.rounding import SAFETY, float32_error_bound


def test_one_matrix_product_gets_its_worst_case_bound_and_float32_lies_within():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 300)).astype(np.float32), rng.standard_normal((300, 5)).astype(np.float32)
    a64, b64 = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    bounded = float32_error_bound(lambda x: x @ b64, [a64])
    per_op = gamma(300) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    row_bound = bounded.bound.numpy()[:, 0]
    # the largest of 4 x 5 uniform draws per row lands near the per-op bound, never above SAFETY x it
    assert np.all(row_bound <= SAFETY * per_op.max(axis=1)) and np.all(row_bound >= 0.5 * per_op.max(axis=1))
    assert np.all(np.abs(a @ b - bounded.result.numpy()) <= row_bound[:, None])
    assert not bounded.unmodelled


def test_exact_ops_add_nothing_and_unknown_arithmetic_is_reported():
    x = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4)
    moved_only = float32_error_bound(lambda t: torch.relu(t).flip(-1)[:, :2], [x])
    assert torch.all(moved_only.bound == 0) and not moved_only.unmodelled
    unknown = float32_error_bound(lambda t: torch.special.i0(t), [x])
    assert unknown.unmodelled == {"aten.i0"}   # no rounding model: a test using it fails until one is written


def test_one_rounding_per_elementwise_op():
    x = torch.linspace(1, 2, 8, dtype=torch.float64)[:, None]
    bounded = float32_error_bound(lambda t: t * 3.0 + 1.0, [x])
    out = (x * 3.0 + 1.0).numpy()
    # a product and a sum: one rounding each, relative to their outputs (3x <= out)
    assert np.all(bounded.bound.numpy() <= SAFETY * 2 * U32 * out)


def test_the_whole_result_bound_for_functions_that_mix_rows():
    rng = np.random.default_rng(1)
    v = torch.from_numpy(rng.standard_normal((20, 16))).double()
    bounded = float32_error_bound(lambda m: m @ m.T, [v], row_wise=False)
    assert bounded.bound.shape == (20, 20) and torch.all(bounded.bound == bounded.bound.max())
    assert 0 < bounded.bound.max() <= SAFETY * gamma(16) * (v.abs() @ v.abs().T).max()

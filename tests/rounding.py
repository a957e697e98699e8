"""Tolerances derived from float32 rounding, for checking a float32 result against a float64 reference.

Two float32 computations of the same formula (a BLAS kernel against a loop, ONNX Runtime against
PyTorch, one CPU against another) may differ in summation order, vector width and FMA use, so their
difference is not a property of the code under test. What is a property of the code: how far a
float32 result lies from the exact value. The tests compute the exact value in float64 from the
same float32 inputs and allow the forward-error bound of the float32 computation.

u = 2^-24 is float32's unit roundoff; gamma(n) = n u / (1 - n u) bounds the relative error of an
n-term sum or dot product summed in any order, with or without FMA (Higham, "Accuracy and Stability
of Numerical Algorithms", 2nd ed., Lemma 3.1 and §3.1):  |fl(x·y) - x·y| <= gamma(n) Σ|x_i y_i|.
"""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24


def gamma(n: int | np.ndarray, u: float = U32):
    """Higham's gamma_n = n u / (1 - n u)."""
    n = np.asarray(n, dtype=np.float64)
    return n * u / (1.0 - n * u)


def dot_bound(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bound on |fl32(x @ y) - x @ y| elementwise: gamma(k) · (|x| @ |y|), k the reduction length."""
    x, y = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(y, np.float64))
    return gamma(x.shape[-1]) * (x @ y)


def assert_within(got, reference, bound, what: str = "result") -> None:
    """Every |got - reference| <= bound (arrays broadcast); the message gives the worst ratio."""
    got64 = np.asarray(got, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    error = np.abs(got64 - reference)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), error.shape)
    assert np.all(np.isfinite(got64)), f"{what}: not finite"
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), (f"{what}: error {error.flat[worst]:.3g} exceeds its float32 rounding bound "
                                    f"{bound.flat[worst]:.3g} (max error {error.max():.3g})")


def exact_inputs(*arrays) -> list:
    """Inputs for a float64 run of a torch module: float arrays widened to float64 (exactly), integers kept."""
    import torch

    tensors = [a if torch.is_tensor(a) else torch.from_numpy(np.asarray(a)) for a in arrays]
    return [t.double() if t.is_floating_point() else t for t in tensors]


def assert_float32_run_of(got, fn, inputs, what: str = "result", *, row_wise: bool = True):
    """`got`, a float32 run of `fn` (ONNX Runtime, PyTorch in float32), lies within float32 rounding of its exact value.

    `fn` runs in float64 (a module converted with `.double()`, inputs from `exact_inputs`); the bound per
    output row propagates each op's float32 rounding bound through `fn` (uclip_cli/export/rounding.py).
    Returns the float64 result and the bound.
    """
    from uclip_cli.export.rounding import float32_error_bound

    reference = float32_error_bound(fn, inputs, row_wise=row_wise)
    assert not reference.unmodelled, f"{what}: ops without a rounding model: {sorted(reference.unmodelled)}"
    assert_within(got, reference.result.numpy(), reference.bound.numpy(), what)
    return reference

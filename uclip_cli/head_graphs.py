"""The heads of a closed-form fit as ONNX graphs, written without torch (onnx_bytes.GraphBuilder).

A closed-form fit (closed_form.py) gives each head as a few matrices; these classes hold them and are
the one description of what the head computes, in three forms: the ONNX graph the runtime runs
(`graph`), the exact float64 function (`exact`) and the same function with every op's result moved by a
random fraction of its float32 rounding bound (`perturbed`), from which `check_graph` derives how far
a float32 run may lie from the exact one (export/rounding.py argues the method: per-op bounds after
Higham §3.1, propagated by Monte Carlo arithmetic; the torch version serves heads trained by PyTorch,
this one heads fitted where torch is not installed).

    LinearHead  (Head_A):  normalise(normalise(x - x Q Qᵀ) M)              Q: the removed subspace (optional)
    KernelHead  (Head_B):  z = normalise(x - x Q Qᵀ);  normalise(z L + k(z) W + b),  k(z)_j = exp(2γ (z·c_j - 1))

These are the functions `uclip train`'s closed-form default writes into its torch heads
(train/closed_form.py set_linear / set_kernel_map): the same maps, so a bundle assembled without torch
and one trained with it differ only in float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .onnx_bytes import FLOAT, GraphBuilder

INPUT, OUTPUT = "features", "embeddings"   # bundle.DEFAULT_GRAPH_IO's names for the heads
EPS = 1e-12                                 # torch.nn.functional.normalize's: a zero row stays zero
U32 = 2.0 ** -24                            # float32's unit roundoff
SAFETY, TRIALS = 2.0, 4                     # as export/rounding.py


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


class _Exact:
    """float64 arithmetic, each op exact up to float64 rounding."""

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a @ b

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def exp(self, a: np.ndarray) -> np.ndarray:
        return np.exp(a)

    def affine(self, a: np.ndarray, scale: float, shift: float) -> np.ndarray:
        return (a + shift) * scale

    def normalise(self, a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), EPS)


class _Perturbed(_Exact):
    """Every op's exact result moved by a uniform random fraction of its float32 error bound."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def _move(self, out: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
        return out + self.rng.uniform(-1.0, 1.0, out.shape) * amplitude

    def matmul(self, a, b):
        return self._move(a @ b, _gamma(a.shape[1]) * (np.abs(a) @ np.abs(b)))

    def add(self, a, b):
        out = a + b
        return self._move(out, U32 * np.abs(out))

    def exp(self, a):
        out = np.exp(a)
        return self._move(out, 4 * U32 * out)

    def affine(self, a, scale, shift):
        shifted = self._move(a + shift, U32 * np.abs(a + shift))
        out = shifted * scale
        return self._move(out, U32 * np.abs(out))

    def normalise(self, a):
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        norm = self._move(norm, (_gamma(a.shape[1] + 1) / 2 + 2 * U32) * norm)
        out = a / np.maximum(norm, EPS)
        return self._move(out, 2 * U32 * np.abs(out))


def _as32(a: np.ndarray | None) -> np.ndarray | None:
    """The weights as the graph stores them (float32), so the exact function uses the same numbers."""
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def _remove(x: np.ndarray, removed: np.ndarray | None, ops: _Exact) -> np.ndarray:
    if removed is None:
        return ops.normalise(x)
    inside = ops.matmul(ops.matmul(x, removed), removed.T)
    return ops.normalise(ops.add(x, -inside))


def _graph_remove(g: GraphBuilder, x: str, removed: np.ndarray | None) -> str:
    if removed is None:
        return _graph_normalise(g, x)
    inside = g.node("MatMul", g.node("MatMul", x, g.weight("removed", removed)), g.weight("removed_t", removed.T.copy()))
    return _graph_normalise(g, g.node("Sub", x, inside))


def _graph_normalise(g: GraphBuilder, x: str, out: str | None = None) -> str:
    eps = g.weight("eps", np.array([EPS], np.float32))
    norm = g.node("Max", g.node("ReduceL2", x, axes=[1], keepdims=1), eps)
    return g.node("Div", x, norm, out=out)


@dataclass(frozen=True)
class LinearHead:
    """Head_A: normalise(normalise(x - x Q Qᵀ) M); removed Q [d, r] (or None), mapping M [d, d_shared]."""

    removed: np.ndarray | None
    mapping: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "removed", _as32(self.removed))
        object.__setattr__(self, "mapping", _as32(self.mapping))

    @property
    def d_in(self) -> int:
        return self.mapping.shape[0]

    @property
    def d_out(self) -> int:
        return self.mapping.shape[1]

    def apply(self, x: np.ndarray, ops: _Exact) -> np.ndarray:
        removed = None if self.removed is None else self.removed.astype(np.float64)
        z = _remove(np.asarray(x, np.float64), removed, ops)
        return ops.normalise(ops.matmul(z, self.mapping.astype(np.float64)))

    def graph(self, name: str = "head_a") -> bytes:
        g = GraphBuilder(name)
        x = g.input(INPUT, FLOAT, ["batch", self.d_in])
        z = _graph_remove(g, x, self.removed)
        _graph_normalise(g, g.node("MatMul", z, g.weight("mapping", self.mapping)), out=OUTPUT)
        g.output(OUTPUT, FLOAT, ["batch", self.d_out])
        return g.to_bytes()


@dataclass(frozen=True)
class KernelHead:
    """Head_B: a linear map plus Gaussian-kernel features around landmark captions (closed_form.fit_kernel_map)."""

    removed: np.ndarray | None   # [d, r] or None
    centres: np.ndarray          # [m, d], L2-normalised landmarks
    gamma: float
    linear: np.ndarray           # [d, d_shared]
    kernel: np.ndarray           # [m, d_shared]
    bias: np.ndarray             # [d_shared]

    def __post_init__(self) -> None:
        for name in ("removed", "centres", "linear", "kernel", "bias"):
            object.__setattr__(self, name, _as32(getattr(self, name)))
        object.__setattr__(self, "gamma", float(np.float32(self.gamma)))

    @property
    def d_in(self) -> int:
        return self.linear.shape[0]

    @property
    def d_out(self) -> int:
        return self.linear.shape[1]

    def apply(self, x: np.ndarray, ops: _Exact) -> np.ndarray:
        f64 = {k: None if getattr(self, k) is None else getattr(self, k).astype(np.float64)
               for k in ("removed", "centres", "linear", "kernel", "bias")}
        z = _remove(np.asarray(x, np.float64), f64["removed"], ops)
        k = ops.exp(ops.affine(ops.matmul(z, f64["centres"].T), 2 * self.gamma, -1.0))
        v = ops.add(ops.add(ops.matmul(z, f64["linear"]), ops.matmul(k, f64["kernel"])), f64["bias"][None, :])
        return ops.normalise(v)

    def graph(self, name: str = "head_b") -> bytes:
        g = GraphBuilder(name)
        x = g.input(INPUT, FLOAT, ["batch", self.d_in])
        z = _graph_remove(g, x, self.removed)
        similarity = g.node("MatMul", z, g.weight("centres_t", self.centres.T.copy()))
        shifted = g.node("Add", similarity, g.weight("minus_one", np.array([-1.0], np.float32)))
        k = g.node("Exp", g.node("Mul", shifted, g.weight("two_gamma", np.array([2 * self.gamma], np.float32))))
        v = g.node("Add", g.node("MatMul", z, g.weight("linear", self.linear)),
                   g.node("MatMul", k, g.weight("kernel", self.kernel)))
        _graph_normalise(g, g.node("Add", v, g.weight("bias", self.bias)), out=OUTPUT)
        g.output(OUTPUT, FLOAT, ["batch", self.d_out])
        return g.to_bytes()


Head = LinearHead | KernelHead


def exact(head: Head, x: np.ndarray) -> np.ndarray:
    """The head's output in float64 (its float32 weights, exactly)."""
    return head.apply(x, _Exact())


def rounding_bound(head: Head, x: np.ndarray, *, trials: int = TRIALS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(exact output, per-row bound on any float32 run's deviation from it): SAFETY x the largest deviation
    of `trials` perturbed runs (export/rounding.py's method)."""
    reference = exact(head, x)
    rng = np.random.default_rng(seed)
    deviation = np.zeros(len(reference))
    for _ in range(trials):
        deviation = np.maximum(deviation, np.abs(head.apply(x, _Perturbed(rng)) - reference).max(axis=1))
    return reference, SAFETY * deviation[:, None]


def check_graph(head: Head, run, inputs: np.ndarray) -> dict[str, float]:
    """Compare `run(float32 rows) -> rows` (the graph under onnxruntime) with the exact head on `inputs`, in
    batches of 1, 7 and the rest; ValueError when a row differs by more than float32 rounding explains."""
    inputs = np.asarray(inputs, np.float32)
    worst, widest = 0.0, 0.0
    for batch in (inputs[:1], inputs[1:8], inputs[8:]):
        if not len(batch):
            continue
        reference, bound = rounding_bound(head, batch)
        error = np.abs(np.asarray(run(batch), np.float64) - reference)
        if error.shape != reference.shape or not np.all(error <= bound):
            raise ValueError(f"differs from the exact head by {error.max():.2e}, beyond float32 rounding "
                             f"({bound.max():.2e})" if error.shape == reference.shape else
                             f"returns shape {error.shape} for {len(batch)} rows, expected {reference.shape}")
        worst, widest = max(worst, float(error.max())), max(widest, float(bound.max()))
    return {"max_abs_diff": worst, "bound": widest}

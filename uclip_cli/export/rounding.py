"""How far a float32 run of a torch network may lie from the exact result: a bound from each op's rounding.

Parity checks (ONNX Runtime against PyTorch, a folded head against the trained one, one CPU against
another) compare two float32 computations of the same formula that differ in summation order, vector
width, FMA use and fusions. A fixed tolerance between them is a guess that fails on the next CPU or
hides a real fault on a deep model. What can be derived is how far *any* float32 run may lie from the
exact value, op by op (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §3.1):

- a k-term dot product, matrix product or convolution, summed in any order, with or without FMA:
  |error| <= gamma(k) * (|A| @ |B|), gamma(k) = k u / (1 - k u), u = 2^-24 (float32's unit roundoff);
- a k-term sum: gamma(k) * sum|x|; a mean adds one division;
- +, -, *, sqrt: one rounding (u |out|); a division: two (a kernel may multiply by a reciprocal);
  exp, erf, tanh, sigmoid, pow, rsqrt: four (vectorised kernels approximate them within a few ulps);
- layer norm, softmax, batch norm, vector norm, GELU: the bounds of their parts, written out below
  (a layer norm's variance is bounded as a one-pass kernel computes it, E[x^2] - E[x]^2, whose
  cancellation is the worst case).

Those per-op bounds are propagated through the network by Monte Carlo arithmetic (Parker 1997; the
Verificarlo tool): the network runs `trials` times with every op's exact output moved by a random
fraction of its bound, independently per element, and the bound on the output is `SAFETY` times the
largest deviation seen in each row. Each per-op bound is a worst case (a real float32 kernel lands
one to three orders of magnitude inside it), so the envelope is loose, yet far below what a real
fault gives (a missing normalisation, a wrong pooling or an unmasked pad moves a unit vector by
1e-2 to 1). Ops that only move or select values (views, gathers, ReLU, masks) are exact.

`float32_error_bound(fn, inputs)` runs `fn` once as given (float64 inputs and module: the exact
reference; float32: the float32 result) and then the perturbed trials, all rows of a trial in one
batch: `fn` must treat its rows independently (eval mode: no batch statistics).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

U32 = 2.0 ** -24
SAFETY = 2.0
TRIALS = 4

aten = torch.ops.aten


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u) for float32."""
    return k * U32 / (1 - k * U32)


def _matmul(k_of: Callable, with_bias: bool):
    def amplitude(out, args, kwargs, func):
        if with_bias:
            bias, a, b = args[:3]
            k = k_of(a) + 1
            return gamma(k) * func(bias.abs(), a.abs(), b.abs(), **kwargs).abs()
        a, b = args[:2]
        return gamma(k_of(a)) * func(a.abs(), b.abs())
    return amplitude


def _convolution(out, args, kwargs, func):
    x, w, bias = args[:3]
    k = w[0].numel() + 1
    return gamma(k) * func(x.abs(), w.abs(), None if bias is None else bias.abs(), *args[3:])


def _reduction(mean: bool):
    def amplitude(out, args, kwargs, func):
        x = args[0]
        k = max(x.numel() // max(out.numel(), 1), 1)
        return (gamma(k) + (U32 if mean else 0.0)) * func(x.abs(), *args[1:], **kwargs).abs()
    return amplitude


def _vector_norm(out, args, kwargs, func):
    x = args[0]
    k = max(x.numel() // max(out.numel(), 1), 1)
    return (gamma(k + 1) / 2 + 2 * U32) * out.abs()   # sum of squares (all positive), then a square root


def _softmax(out, args, kwargs, func):
    x, dim = args[0], args[1]
    k = x.shape[dim]
    shifted = (x - x.amax(dim, keepdim=True)).abs()
    # p_i = exp(x_i - m) / sum_j exp(x_j - m): the shift rounds (u |x_i - m| in the exponent), exp and the
    # division round, the k positive terms sum within gamma(k); masked positions (p = 0) add nothing.
    spread = torch.where(out > 0, shifted, torch.zeros_like(shifted))
    relative = gamma(k) + 6 * U32 + U32 * spread + U32 * (out * spread).sum(dim, keepdim=True)
    return relative * out.abs()


def _layer_norm_parts(x, dims, eps):
    k = 1
    for d in dims:
        k *= x.shape[d]
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    sigma = torch.sqrt(var + eps)
    d_mu = gamma(k) * x.abs().mean(dims, keepdim=True)
    d_var = gamma(k + 2) * (x * x).mean(dims, keepdim=True)     # one-pass E[x^2] - mu^2: the worst case
    rel_sigma = d_var / (2 * (var + eps)) + 2 * U32
    return mu, sigma, d_mu, rel_sigma


def _affine(n, d_n, weight, bias, out):
    w = weight.abs() if weight is not None else 1.0
    amp = w * d_n + U32 * (n * (weight if weight is not None else 1.0)).abs() + U32 * out.abs()
    return amp


def _layer_norm(out, args, kwargs, func):
    x, shape, weight, bias, eps = args[:5]
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mu, sigma, d_mu, rel_sigma = _layer_norm_parts(x, dims, eps)
    n = (x - mu) / sigma
    d_n = (d_mu + U32 * (x - mu).abs()) / sigma + n.abs() * (rel_sigma + U32)
    return _affine(n, d_n, weight, bias, out)


def _batch_norm(out, args, kwargs, func):
    """Eval-mode batch norm with running statistics: (x - mean) / sqrt(var + eps) * w + b."""
    x, weight, bias, mean, var = args[:5]
    eps = args[-1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = mean.view(shape), var.view(shape)
    weight = weight.view(shape) if weight is not None else None
    sigma = torch.sqrt(var + eps)
    n = (x - mean) / sigma
    d_n = U32 * (x - mean).abs() / sigma + n.abs() * 4 * U32
    return _affine(n, d_n, weight, None, out)


def _gelu(out, args, kwargs, func):
    x = args[0]
    return 4 * U32 * (out.abs() + x.abs())   # x * Phi(x): Phi's 1 + erf cancels for negative x


AMPLITUDES: dict = {
    aten.mm: _matmul(lambda a: a.shape[-1], False),
    aten.bmm: _matmul(lambda a: a.shape[-1], False),
    aten.addmm: _matmul(lambda a: a.shape[-1], True),
    aten.baddbmm: _matmul(lambda a: a.shape[-1], True),
    aten.convolution: _convolution,
    aten.sum: _reduction(mean=False),
    aten.mean: _reduction(mean=True),
    aten.linalg_vector_norm: _vector_norm,
    aten._softmax: _softmax,
    aten.native_layer_norm: _layer_norm,
    aten.native_batch_norm: _batch_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm,
    aten.gelu: _gelu,
}
for _op in (aten.add, aten.sub, aten.rsub, aten.mul, aten.sqrt):
    AMPLITUDES[_op] = lambda out, args, kwargs, func: U32 * out.abs()
for _op in (aten.div, aten.reciprocal):
    AMPLITUDES[_op] = lambda out, args, kwargs, func: 2 * U32 * out.abs()
for _op in (aten.exp, aten.log, aten.erf, aten.tanh, aten.sigmoid, aten.rsqrt, aten.pow, aten.expm1, aten.log1p):
    AMPLITUDES[_op] = lambda out, args, kwargs, func: 4 * U32 * out.abs()

# Ops that only move, select, compare or copy values: exact in any float format.
EXACT = {
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand, aten.clone,
    aten.contiguous, aten.select, aten.slice, aten.index, aten.gather, aten.embedding, aten.cat, aten.stack,
    aten.split, aten.split_with_sizes, aten.unsqueeze, aten.squeeze, aten.detach, aten.alias, aten.copy_,
    aten._to_copy, aten.to, aten.lift_fresh, aten.relu, aten.clamp_min, aten.clamp, aten.where, aten.neg, aten.abs,
    aten.amax, aten.max, aten.min, aten.argmax, aten.masked_fill, aten.repeat, aten.flatten, aten.unbind,
    aten.zeros, aten.ones, aten.zeros_like, aten.ones_like, aten.empty, aten.empty_like, aten.full, aten.full_like,
    aten.fill_, aten.zero_, aten.arange, aten.scalar_tensor, aten.new_ones, aten.new_zeros, aten.new_full,
    aten._local_scalar_dense, aten.cumsum, aten.index_select, aten.roll, aten.flip, aten.pad, aten.constant_pad_nd,
}


class _Perturbed(TorchDispatchMode):
    """Moves each op's exact output by a random fraction (uniform in [-1, 1]) of its float32 error bound."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator
        self.unmodelled: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        amplitude = AMPLITUDES.get(packet)
        first = out[0] if isinstance(out, tuple) else out
        if amplitude is None:
            if packet not in EXACT and isinstance(first, torch.Tensor) and first.is_floating_point():
                self.unmodelled.add(str(packet))
            return out
        if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
            return out
        amp = amplitude(first, args, kwargs, func)
        theta = torch.rand(first.shape, generator=self.generator, dtype=first.dtype) * 2 - 1
        moved = first + theta * amp
        return (moved, *out[1:]) if isinstance(out, tuple) else moved


class ErrorBound:
    """The unperturbed result, a bound on each row's float32 error (broadcastable to it), ops left unmodelled."""

    def __init__(self, result: torch.Tensor, bound: torch.Tensor, unmodelled: set[str]):
        self.result = result
        self.bound = bound
        self.unmodelled = unmodelled


def float32_error_bound(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, trials: int = TRIALS,
                        seed: int = 0, row_wise: bool = True) -> ErrorBound:
    """Run `fn(*inputs)` exactly, then `trials` perturbed runs; see the module docstring.

    row_wise: every input is batched along dim 0 and `fn` maps row i of its inputs to row i of its
    output on its own; the trials then run as one batch and the bound is per output row (SAFETY x the
    largest deviation of any element of that row). Otherwise the trials run one by one and the bound
    is one number for the whole result.
    """
    mode = _Perturbed(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        result = fn(*inputs)
        if row_wise:
            rows = result.shape[0]
            stacked = [x.repeat(trials, *([1] * (x.dim() - 1))) for x in inputs]
            with mode:
                moved = fn(*stacked)
            deviation = (moved.reshape(trials, rows, -1) - result.reshape(1, rows, -1)).abs()
            per_row = deviation.amax(dim=(0, 2))
            bound = SAFETY * per_row.reshape((rows,) + (1,) * (result.dim() - 1))
        else:
            largest = torch.zeros((), dtype=result.dtype)
            for _ in range(trials):
                with mode:
                    moved = fn(*inputs)
                largest = torch.maximum(largest, (moved - result).abs().max())
            bound = SAFETY * largest.expand(result.shape)
    return ErrorBound(result, bound, mode.unmodelled)

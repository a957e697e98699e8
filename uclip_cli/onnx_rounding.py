"""How far a float32 run of a published ONNX graph may lie from its exact result, without torch.

The default model's multilingual tower comes as a graph someone else exported (assemble.py). Fusing it
(tower_fusion.py: ONNX Runtime's transformer optimizer, issue 22 item 3) gives another float32 graph of
the same formula, and the fused one is kept only if it lies within float32 rounding of the published
one's *exact* result, the rule every parity check of uclip follows (export/rounding.py, export/parity.py).
The export gets its exact result and its bound from PyTorch in float64; a user's machine assembling the
default model has no torch, so here ONNX Runtime is the float64 machine, on the published graph itself:

1. `float64_graph`: every float tensor of the graph (weights, inputs and outputs, constants, Cast targets)
   becomes float64. A table that only Gather reads (the 250,002 x 384 word-embedding table) stays
   float32 and the rows it gives are cast: exact, and half the memory. ONNX Runtime has no float64 Erf;
   erf runs in float32 between two casts (the cast back is where step 2 models erf's rounding). That one
   op of the reference is then within an ulp or two of the exact erf, inside the 4 ulp each trial below
   moves it by, so the reference is itself within the bound of the exact result, and a float32 run may
   differ from it by twice the bound (PARITY_RULE).
2. `perturbed_graph`: after every op whose float32 result is rounded, its exact result is moved by a
   random fraction (uniform in [-1, 1]) of that op's float32 error bound, the same per-op bounds as
   export/rounding.py (Higham; Monte Carlo arithmetic): k-term products and sums gamma(k) |A| |B|,
   +, -, *, sqrt one rounding, a division two, erf/exp/tanh/pow four, softmax and layer normalisation
   their parts'. The fraction is RandomUniformLike times the graph input NOISE_INPUT: 0 gives the exact
   run, 1 a perturbed one, from one session. Ops that only move, select or compare values are exact.
   An op that rounds and is not modelled here raises Unmodelled: no bound is claimed for such a graph.
3. `Reference.exact_and_bound`: the exact run, then TRIALS perturbed copies of the same rows in one batch (the
   rows of a sentence encoder are independent); the bound of each row is SAFETY times the largest
   deviation of its elements (those `valid` marks: a padded token's output is never read).

Needs the `onnx` package (graph surgery); the sessions come from the caller's SessionFactory
(`create_reference`: the CPU, no graph optimisation, so the float64 graph runs as written).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .sessions import SessionFactory

U32 = 2.0 ** -24           # float32's unit roundoff
SAFETY = 2.0               # as export/rounding.py
TRIALS = 4
NOISE_INPUT = "uclip_noise_scale"
PARITY_RULE = ("|float32 - float64 reference| <= 2 x the float32 rounding bound of each row "
               "(uclip_cli/onnx_rounding.py: the reference runs erf in float32)")

_FLOAT, _DOUBLE = 1, 11    # TensorProto.FLOAT, TensorProto.DOUBLE
_ERF_CAST = "__uclip_erf_result"    # the Cast that brings a float32 erf back: where erf's rounding is modelled

# Ops that only move, select, compare or copy values: exact in any float format.
EXACT = {
    "Reshape", "Transpose", "Gather", "GatherElements", "GatherND", "Slice", "Concat", "Unsqueeze", "Squeeze",
    "Expand", "Where", "Identity", "Flatten", "Cast", "CastLike", "Shape", "Size", "Constant", "ConstantOfShape",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf",
    "Range", "Neg", "Abs", "Relu", "Max", "Min", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "Split", "Tile",
    "Pad", "Clip", "Sign", "Floor", "Ceil", "Round", "Trilu", "NonZero", "Dropout",
}
ONE_ROUNDING = {"Add", "Sub", "Mul", "Sqrt"}
TWO_ROUNDINGS = {"Div", "Reciprocal"}
FOUR_ROUNDINGS = {"Exp", "Log", "Erf", "Tanh", "Sigmoid", "Pow"}


class Unmodelled(Exception):
    """The graph has an op that rounds and that this module has no bound for (its type is the message)."""


# ------------------------------------------------------------------------------------------ float64

def float64_graph(model: Any, *, in_place: bool = False) -> Any:
    """A float64 copy of `model` (an onnx.ModelProto; changed itself with in_place): step 1 of the module docstring."""
    import onnx
    from onnx import helper, numpy_helper

    if not in_place:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    gathered_only = _read_only_by_gather(graph)
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == _FLOAT and tensor.name not in gathered_only:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == _FLOAT:
            info.type.tensor_type.elem_type = _DOUBLE
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == _FLOAT:
                attribute.i = _DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == _FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64),
                                                             attribute.t.name))
        if node.op_type == "Constant" and node.attribute[0].name in ("value_float", "value_floats"):
            value = np.asarray(helper.get_attribute_value(node.attribute[0]), dtype=np.float64)
            nodes.append(helper.make_node("Constant", [], list(node.output), value=numpy_helper.from_array(value)))
        elif node.op_type == "Gather" and node.input[0] in gathered_only:
            rows = node.output[0] + "__float32"
            nodes += [helper.make_node("Gather", list(node.input), [rows], axis=_attribute(node, "axis", 0)),
                      helper.make_node("Cast", [rows], [node.output[0]], to=_DOUBLE)]
        elif node.op_type == "Erf":            # no float64 Erf in ONNX Runtime (module docstring, step 1)
            x, y = node.input[0], node.output[0]
            nodes += [helper.make_node("Cast", [x], [x + "__erf_in"], to=_FLOAT),
                      helper.make_node("Erf", [x + "__erf_in"], [y + "__erf_out"]),
                      helper.make_node("Cast", [y + "__erf_out"], [y], to=_DOUBLE, name=f"{_ERF_CAST}_{len(nodes)}")]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _read_only_by_gather(graph: Any) -> set[str]:
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, position))
    outputs = {o.name for o in graph.output}
    return {t.name for t in graph.initializer
            if t.data_type == _FLOAT and readers.get(t.name) and readers[t.name] <= {("Gather", 0)} and t.name not in outputs}


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


# ------------------------------------------------------------------------------------------ perturbation

class _Builder:
    """New nodes and double constants, with names that cannot clash with the graph's."""

    def __init__(self, opset: int):
        self.nodes: list[Any] = []
        self.constants: list[Any] = []
        self.opset = opset
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"__uclip_round_{self.count}_{hint}"

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def like(self, node: Any, *inputs: str) -> str:
        """A copy of `node` (its attributes) on other inputs."""
        import onnx

        copy = onnx.NodeProto.FromString(node.SerializeToString())
        copy.name = self.name(node.op_type)
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.append(copy.name)
        self.nodes.append(copy)
        return copy.name

    def const(self, value: float | list[int], dtype: Any = np.float64) -> str:
        from onnx import numpy_helper

        name = self.name("const")
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def reduce(self, op_type: str, x: str, axes: list[int] | None, keepdims: int) -> str:
        """A reduction over `axes` (None: as the op's default) in the graph's opset's own form."""
        if axes is None:
            return self.op(op_type, x, keepdims=keepdims)
        takes_input = op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18
        if takes_input:
            return self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def gamma(self, k: str) -> str:
        """Higham's gamma_k = k u / (1 - k u) of a float64 tensor k."""
        ku = self.op("Mul", k, self.const(U32))
        return self.op("Div", ku, self.op("Sub", self.const(1.0), ku))

    def count_ratio(self, x: str, y: str) -> str:
        """How many elements of x went into each of y (a reduction's term count), float64."""
        return self.op("Div", self.op("Cast", self.op("Size", x), to=_DOUBLE), self.op("Cast", self.op("Size", y), to=_DOUBLE))

    def scaled(self, factor: float, y: str) -> str:
        return self.op("Mul", self.const(factor), self.op("Abs", y))


def _amplitude(node: Any, b: _Builder, y: str) -> str:
    """The float32 error bound of `node`'s result `y` (its exact value), as export/rounding.py's AMPLITUDES."""
    op = node.op_type
    if op == "Cast" and node.name.startswith(_ERF_CAST):
        op = "Erf"
    if op in ONE_ROUNDING:
        return b.scaled(U32, y)
    if op in TWO_ROUNDINGS:
        return b.scaled(2 * U32, y)
    if op in FOUR_ROUNDINGS:
        return b.scaled(4 * U32, y)
    if op == "MatMul":
        a, w = node.input[:2]
        k = b.op("Cast", b.op("Slice", b.op("Shape", a), b.const([-1], np.int64), b.const([2 ** 62], np.int64)), to=_DOUBLE)
        return b.op("Mul", b.gamma(k), b.op("MatMul", b.op("Abs", a), b.op("Abs", w)))
    if op == "Gemm":
        a = node.input[0]
        contracted = b.const([1 if _attribute(node, "transA", 0) == 0 else 0], np.int64)
        k = b.op("Cast", b.op("Gather", b.op("Shape", a), contracted), to=_DOUBLE)
        magnitudes = b.like(node, *(b.op("Abs", name) for name in node.input if name))
        return b.op("Mul", b.gamma(b.op("Add", k, b.const(1.0))), b.op("Abs", magnitudes))
    if op in ("ReduceMean", "ReduceSum"):
        x = node.input[0]
        total = b.like(node, b.op("Abs", x), *node.input[1:])        # the same axes, however the opset gives them
        factor = b.gamma(b.count_ratio(x, y))
        if op == "ReduceMean":
            factor = b.op("Add", factor, b.const(U32))
        return b.op("Mul", factor, total)
    if op == "Softmax":
        axis = _attribute(node, "axis", -1 if b.opset >= 13 else 1)
        if b.opset < 13:
            raise Unmodelled("Softmax before opset 13 (it flattens)")
        x = node.input[0]
        top = b.reduce("ReduceMax", x, [axis], 1)
        zero = b.const(0.0)
        spread = b.op("Where", b.op("Greater", y, zero), b.op("Abs", b.op("Sub", x, top)), zero)
        k = b.count_ratio(x, top)
        mixed = b.reduce("ReduceSum", b.op("Mul", y, spread), [axis], 1)
        relative = b.op("Add", b.op("Add", b.gamma(k), b.const(6 * U32)),
                        b.op("Add", b.op("Mul", b.const(U32), spread), b.op("Mul", b.const(U32), mixed)))
        return b.op("Mul", relative, b.op("Abs", y))
    if op == "LayerNormalization":
        if _attribute(node, "axis", -1) != -1:
            raise Unmodelled("LayerNormalization over more than the last axis")
        return _layer_norm(node, b, y)
    raise Unmodelled(op)


def _layer_norm(node: Any, b: _Builder, y: str) -> str:
    """export/rounding.py's _layer_norm: the one-pass variance's cancellation is the worst case."""
    x, scale = node.input[0], node.input[1]
    eps = b.const(float(_attribute(node, "epsilon", 1e-5)))
    mu = b.reduce("ReduceMean", x, [-1], 1)
    centred = b.op("Sub", x, mu)
    var = b.reduce("ReduceMean", b.op("Mul", centred, centred), [-1], 1)
    var_eps = b.op("Add", var, eps)
    sigma = b.op("Sqrt", var_eps)
    k = b.count_ratio(x, mu)
    d_mu = b.op("Mul", b.gamma(k), b.reduce("ReduceMean", b.op("Abs", x), [-1], 1))
    d_var = b.op("Mul", b.gamma(b.op("Add", k, b.const(2.0))), b.reduce("ReduceMean", b.op("Mul", x, x), [-1], 1))
    rel_sigma = b.op("Add", b.op("Div", d_var, b.op("Mul", b.const(2.0), var_eps)), b.const(2 * U32))
    n = b.op("Div", centred, sigma)
    d_n = b.op("Add", b.op("Div", b.op("Add", d_mu, b.op("Mul", b.const(U32), b.op("Abs", centred))), sigma),
               b.op("Mul", b.op("Abs", n), b.op("Add", rel_sigma, b.const(U32))))
    weight = b.op("Abs", scale)
    return b.op("Add", b.op("Add", b.op("Mul", weight, d_n), b.op("Mul", b.const(U32), b.op("Abs", b.op("Mul", n, scale)))),
                b.op("Mul", b.const(U32), b.op("Abs", y)))


def _without_weights(model: Any) -> Any:
    """The graph with its initialisers as typed inputs, no data: enough for type inference, no copy of the weights."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer)
    return light


def perturbed_graph(model64: Any, *, seed: int = 0) -> Any:
    """`model64` (float64_graph's) with every rounding op's result moved: step 2 of the module docstring."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model64))
    types = {info.name: info.type.tensor_type.elem_type
             for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    opset = next((o.version for o in model64.opset_import if o.domain in ("", "ai.onnx")), 13)
    b = _Builder(opset)
    zero = b.const(0.0)
    nodes = []
    for index, node in enumerate(model64.graph.node):
        produced = [o for o in node.output if o]
        rounded = [o for o in produced if types.get(o, _DOUBLE) == _DOUBLE]     # a type not inferred: assume it rounds
        if (node.op_type in EXACT and not node.name.startswith(_ERF_CAST)) or not rounded:
            nodes.append(node)
            continue
        if node.domain not in ("", "ai.onnx") or len(produced) != 1:
            raise Unmodelled(node.op_type)
        y = produced[0]
        exact = y + "__exact"
        moved = onnx.NodeProto.FromString(node.SerializeToString())
        moved.output[list(moved.output).index(y)] = exact
        nodes.append(moved)
        before = len(b.nodes)
        amplitude = _amplitude(node, b, exact)
        bad = b.op("Or", b.op("IsInf", amplitude), b.op("IsNaN", amplitude))    # masks of -inf: no bound needed
        amplitude = b.op("Where", bad, zero, amplitude)
        noise = b.op("RandomUniformLike", exact, dtype=_DOUBLE, low=-1.0, high=1.0, seed=float(seed * 100003 + index))
        shift = b.op("Mul", b.op("Mul", amplitude, noise), NOISE_INPUT)
        b.nodes.append(helper.make_node("Add", [exact, shift], [y]))
        nodes += b.nodes[before:]
        del b.nodes[before:]
    graph = model64.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(b.constants)
    graph.input.append(helper.make_tensor_value_info(NOISE_INPUT, _DOUBLE, []))
    return model64


# ------------------------------------------------------------------------------------------ the bound

class Reference:
    """The float64 machine of a graph file: its exact result and each row's float32 error bound (step 3)."""

    def __init__(self, path: str | os.PathLike, sessions: SessionFactory, *, trials: int = TRIALS, seed: int = 0):
        import onnx

        model = perturbed_graph(float64_graph(onnx.load(str(path)), in_place=True), seed=seed)
        graph = model.SerializeToString()
        del model                       # one copy of the weights at a time (the float64 graph is ~1.4x the file)
        self.session = sessions.create_reference(graph, f"the float64 reference of {Path(path).name}")
        del graph
        release_memory()
        self.trials = trials

    def exact_and_bound(self, feeds: dict[str, np.ndarray], *, valid: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(the float64 result of the graph's first output for `feeds`, the float32 error bound of each row:
        shape [rows], SAFETY x the largest deviation of the row's `valid` elements over the perturbed runs).
        `valid` broadcasts against the output's leading axes (an attention mask [rows, tokens]); None: all."""
        feeds = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}   # exact
        rows = len(next(iter(feeds.values())))
        exact = self.session.run({**feeds, NOISE_INPUT: np.array(0.0)})
        stacked = {k: np.concatenate([v] * self.trials) for k, v in feeds.items()}
        moved = self.session.run({**stacked, NOISE_INPUT: np.array(1.0)}).reshape(self.trials, *exact.shape)
        deviation = np.abs(moved - exact[None])
        if valid is not None:
            deviation = np.where(_keep(valid, exact.ndim)[None], deviation, 0.0)
        return exact, SAFETY * deviation.reshape(self.trials, rows, -1).max(axis=(0, 2))


def release_memory() -> None:
    """Hand freed heap back to the system (glibc keeps large freed protobuf buffers otherwise): the graphs
    handled here are hundreds of MB each, and assembly goes on to fit the heads in the same process."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to hand back this way
        pass


def _keep(valid: np.ndarray, ndim: int) -> np.ndarray:
    valid = np.asarray(valid, bool)
    return valid.reshape(valid.shape + (1,) * (ndim - valid.ndim))


def error_to_bound(candidate: np.ndarray, exact: np.ndarray, bound: np.ndarray, valid: np.ndarray | None = None) -> float:
    """max over rows of |candidate - exact| / (2 x bound) (PARITY_RULE): <= 1 holds."""
    error = np.abs(candidate.astype(np.float64) - exact)
    if valid is not None:
        error = np.where(_keep(valid, exact.ndim), error, 0.0)
    per_row = error.reshape(len(exact), -1).max(axis=1)
    allowed = 2 * bound
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, per_row / allowed, np.where(per_row > 0, np.inf, 0.0))
    return float(ratio.max()) if len(ratio) else 0.0

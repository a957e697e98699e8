"""Small ONNX graphs serialised by hand from the protobuf schema, so the runtime needs only onnxruntime
(the `onnx` package is not a runtime dependency; tests check these graphs with onnx's checker).

Two users: one-node graphs (the exact search's integer kernel, the provider probe: `single_node_model`)
and the heads of an assembled default bundle (`GraphBuilder`: a handful of nodes and float32 weights,
head_graphs.py). Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto,
AttributeProto, TensorProto, ValueInfoProto); proto2 accepts repeated scalars unpacked, as written here.
"""
from __future__ import annotations

import struct

import numpy as np

FLOAT, UINT8, INT8, INT32, INT64 = 1, 2, 3, 6, 7   # TensorProto.DataType
_ATTRIBUTE_FLOAT, _ATTRIBUTE_INT, _ATTRIBUTE_INTS = 1, 2, 7   # AttributeProto.AttributeType
_DATA_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(np.int32): INT32}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1   # negative int64 values: two's complement, as protobuf writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _num(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    shape = b"".join(_msg(1, _num(1, d) if isinstance(d, int) else _msg(2, d.encode())) for d in dims)
    return _msg(1, name.encode()) + _msg(2, _msg(1, _num(1, elem_type) + _msg(2, shape)))


def _model(graph: bytes, opset: int, producer: str = "") -> bytes:
    head = _num(1, 8) + (_msg(2, producer.encode()) if producer else b"")
    return head + _msg(7, graph) + _msg(8, _msg(1, b"") + _num(2, opset))


def single_node_model(op: str, inputs: list[tuple[str, int, list[int | str]]],
                      output: tuple[str, int, list[int | str]], graph_name: str, opset: int = 13) -> bytes:
    """A ModelProto (IR version 8) holding one node `op` from `inputs` (name, type, dims) to `output`.

    An input may be listed twice under the same name (the node then reads it twice, declared once).
    """
    node = b"".join(_msg(1, name.encode()) for name, _, _ in inputs) + _msg(2, output[0].encode()) + _msg(4, op.encode())
    declared = dict.fromkeys((name, elem, tuple(dims)) for name, elem, dims in inputs)
    graph = (_msg(1, node) + _msg(2, graph_name.encode())
             + b"".join(_msg(11, _value_info(name, elem, list(dims))) for name, elem, dims in declared)
             + _msg(12, _value_info(*output)))
    return _model(graph, opset)


def _attribute(name: str, value: int | float | list[int]) -> bytes:
    if isinstance(value, bool) or isinstance(value, int):
        return _msg(1, name.encode()) + _num(3, int(value)) + _num(20, _ATTRIBUTE_INT)
    if isinstance(value, float):
        return _msg(1, name.encode()) + _float(2, value) + _num(20, _ATTRIBUTE_FLOAT)
    return _msg(1, name.encode()) + b"".join(_num(8, int(v)) for v in value) + _num(20, _ATTRIBUTE_INTS)


class GraphBuilder:
    """A graph of a few nodes with constant weights (initializers), written as one ModelProto.

    `node` returns the name of its (single) output, so a graph reads as a chain of calls:
        y = g.node("MatMul", x, g.weight("w", w))
    Weights are stored as float32 / int64 raw data, little-endian, as ONNX requires.
    """

    def __init__(self, name: str):
        self.name = name
        self._nodes: list[bytes] = []
        self._weights: list[bytes] = []
        self._inputs: list[bytes] = []
        self._outputs: list[bytes] = []
        self._weight_names: set[str] = set()
        self._count = 0

    def input(self, name: str, elem_type: int, dims: list[int | str]) -> str:
        self._inputs.append(_value_info(name, elem_type, dims))
        return name

    def output(self, name: str, elem_type: int, dims: list[int | str]) -> None:
        self._outputs.append(_value_info(name, elem_type, dims))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A constant input of the graph; a name given before is the same weight (written once)."""
        if name in self._weight_names:
            return name
        self._weight_names.add(name)
        array = np.asarray(array)
        if array.dtype not in _DATA_TYPES:
            raise TypeError(f"weight {name}: dtype {array.dtype} (float32, int32 or int64 only)")
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        tensor = (b"".join(_num(1, d) for d in array.shape) + _num(2, _DATA_TYPES[array.dtype])
                  + _msg(8, name.encode()) + _msg(9, raw))
        self._weights.append(tensor)
        return name

    def node(self, op: str, *inputs: str, out: str | None = None, **attributes: int | float | list[int]) -> str:
        self._count += 1
        out = out or f"{op.lower()}_{self._count}"
        body = (b"".join(_msg(1, name.encode()) for name in inputs) + _msg(2, out.encode())
                + _msg(3, f"{op}_{self._count}".encode()) + _msg(4, op.encode())
                + b"".join(_msg(5, _attribute(k, v)) for k, v in attributes.items()))
        self._nodes.append(body)
        return out

    def to_bytes(self, opset: int = 13, producer: str = "uclip") -> bytes:
        graph = (b"".join(_msg(1, n) for n in self._nodes) + _msg(2, self.name.encode())
                 + b"".join(_msg(5, w) for w in self._weights)
                 + b"".join(_msg(11, i) for i in self._inputs) + b"".join(_msg(12, o) for o in self._outputs))
        return _model(graph, opset, producer)

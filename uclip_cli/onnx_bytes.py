"""Tiny ONNX graphs serialised by hand from the protobuf schema, so the runtime needs only onnxruntime
(the `onnx` package is not a runtime dependency; tests check these graphs with onnx's checker)."""
from __future__ import annotations

FLOAT, UINT8, INT8, INT32 = 1, 2, 3, 6   # TensorProto.DataType


def _varint(n: int) -> bytes:
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


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    shape = b"".join(_msg(1, _num(1, d) if isinstance(d, int) else _msg(2, d.encode())) for d in dims)
    return _msg(1, name.encode()) + _msg(2, _msg(1, _num(1, elem_type) + _msg(2, shape)))


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
    return _num(1, 8) + _msg(7, graph) + _msg(8, _msg(1, b"") + _num(2, opset))

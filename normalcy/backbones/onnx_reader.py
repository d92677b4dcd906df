"""Read the graph of an ONNX file without the `onnx` package.

Only what weight conversion needs: initializer tensors (name, shape, float data) and nodes
(op type, inputs, outputs). ONNX files are protocol buffers; this walks their wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE = 1, 2, 4
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 4, 8, 9
_FLOAT32 = 1


@dataclass(frozen=True)
class OnnxNode:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class OnnxGraph:
    initializers: dict[str, np.ndarray]
    nodes: list[OnnxNode]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated ONNX data: a varint runs past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) for one message; LEN values as memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
            continue
        if wire == 1:
            length = 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
        elif wire == 5:
            length = 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos + length > end:
            raise ValueError("truncated ONNX data: a field runs past the end")
        yield number, wire, buf[pos : pos + length]
        pos += length


def _packed_varints(value: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    dims: list[int] = []
    name, data_type, raw, floats = "", 0, None, None
    for number, wire, value in _fields(buf):
        if number == _TENSOR_DIMS:
            dims.extend(_packed_varints(value) if wire == 2 else [value])
        elif number == _TENSOR_DATA_TYPE:
            data_type = value
        elif number == _TENSOR_NAME:
            name = bytes(value).decode()
        elif number == _TENSOR_RAW:
            raw = value
        elif number == _TENSOR_FLOAT_DATA and wire == 2:
            floats = value
    data = raw if raw is not None else floats
    if data_type != _FLOAT32 or data is None:
        return name, None
    return name, np.frombuffer(data, dtype="<f4").reshape(dims).copy()


def _node(buf: memoryview) -> OnnxNode:
    inputs, outputs, op_type = [], [], ""
    for number, _, value in _fields(buf):
        if number == _NODE_INPUT:
            inputs.append(bytes(value).decode())
        elif number == _NODE_OUTPUT:
            outputs.append(bytes(value).decode())
        elif number == _NODE_OP_TYPE:
            op_type = bytes(value).decode()
    return OnnxNode(op_type, tuple(inputs), tuple(outputs))


def parse_onnx(data: bytes) -> OnnxGraph:
    """Float32 initializers and nodes of a serialized ONNX model."""
    view = memoryview(data)
    graph = next((v for n, w, v in _fields(view) if n == _MODEL_GRAPH and w == 2), None)
    if graph is None:
        raise ValueError("not an ONNX model: no graph found")
    initializers: dict[str, np.ndarray] = {}
    nodes: list[OnnxNode] = []
    for number, _, value in _fields(graph):
        if number == _GRAPH_INITIALIZER:
            name, array = _tensor(value)
            if array is not None:
                initializers[name] = array
        elif number == _GRAPH_NODE:
            nodes.append(_node(value))
    return OnnxGraph(initializers, nodes)
